"""Calibration data: every source gives seeded, reproducible, packed token windows."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens, load_documents
from quantkit.errors import QuantkitError


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def test_dummy_is_seeded(tokenizer):
    a = calibration_tokens(DatasetSpec("dummy"), tokenizer, 64, 4, 16, seed=1)
    b = calibration_tokens(DatasetSpec("dummy"), tokenizer, 64, 4, 16, seed=1)
    c = calibration_tokens(DatasetSpec("dummy"), tokenizer, 64, 4, 16, seed=2)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 64


def test_txt_splits_at_blank_lines_and_packs(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick fox\n\n\nover a dog\n  \nseven wizards hum")
    assert load_documents(DatasetSpec(str(path))) == ["the quick fox", "over a dog", "seven wizards hum"]
    tokens = calibration_tokens(DatasetSpec(str(path)), tokenizer, 64, 2, 4, seed=0)
    eos = tokenizer.eos_token_id
    assert tokens.shape == (2, 4) and (tokens == eos).sum() >= 1  # documents are joined with EOS


def test_jsonl_and_parquet_text_columns(tmp_path, tokenizer):
    rows = [{"body": "the quick brown fox"}, {"body": "jumps over a lazy dog"}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        assert load_documents(DatasetSpec(str(path), text_column="body")) == [r["body"] for r in rows]
    with pytest.raises(QuantkitError, match="no column 'text'"):
        load_documents(DatasetSpec(str(jsonl)))


def test_gsm8k_from_local_files(tmp_path, tokenizer):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "what is seven", "answer": "seven #### 7"}) + "\n")
    assert load_documents(DatasetSpec("gsm8k", (str(path),))) == ["what is seven\nseven #### 7"]


def test_gsm8k_offline_without_files_is_a_clear_error():
    with pytest.raises(QuantkitError, match="--data-files"):
        load_documents(DatasetSpec("gsm8k"))


def test_too_few_samples_is_a_clear_error(text_file, tokenizer):
    with pytest.raises(QuantkitError, match="fewer than the 100000 asked"):
        calibration_tokens(DatasetSpec(str(text_file)), tokenizer, 64, 100000, 64, seed=0)
