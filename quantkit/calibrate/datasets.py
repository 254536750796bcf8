"""Calibration data: seeded, reproducible [num_samples, seq_len] token batches.

Sources:
- ``dummy``: uniform random token ids from a seeded generator (mlc-llm's ``--dataset=dummy``);
- ``gsm8k``: HF ``openai/gsm8k`` (config ``main``, train split), each document "question\\nanswer";
  offline from ``data_files`` (jsonl or parquet with ``question`` and ``answer`` columns);
- a local file: ``.txt`` (documents split at blank lines) or ``.jsonl`` / ``.parquet`` with a text
  column (``text_column``, default ``text``).
Documents are shuffled with the seed, tokenized without special tokens, joined with EOS and packed
into consecutive ``seq_len`` windows, so no sample has padding (and no padding reaches a Hessian).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    name: str                                  # "dummy", "gsm8k", or a path to a local file
    data_files: tuple[str, ...] = field(default=())
    text_column: str = "text"

    def describe(self) -> dict:
        return {"name": self.name, "data_files": [str(Path(f).resolve()) for f in self.data_files],
                "text_column": self.text_column}


def _read_table(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json or .parquet file."""
    if not path.is_file():
        raise QuantkitError(f"data file not found: {path}")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise QuantkitError(f"cannot read {path}: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None


def _column(rows: list[dict], column: str, path) -> list[str]:
    if rows and column not in rows[0]:
        raise QuantkitError(f"{path} has no column '{column}' (columns: {', '.join(rows[0])}); use --text-column")
    return [str(row[column]) for row in rows if row.get(column)]


def _gsm8k_documents(data_files: tuple[str, ...]) -> list[str]:
    if data_files:
        rows = [row for f in data_files for row in _read_table(Path(f))]
        for required in ("question", "answer"):
            _column(rows[:1], required, data_files[0])
    else:
        rows = _gsm8k_from_hub()
    return [f"{row['question']}\n{row['answer']}" for row in rows]


def _gsm8k_from_hub() -> list[dict]:
    offline_hint = "pass --data-files PATH to a local gsm8k .jsonl or .parquet (columns question, answer)"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise QuantkitError(f"gsm8k is not available offline; {offline_hint}")
    try:
        import datasets
        return list(datasets.load_dataset("openai/gsm8k", "main", split="train"))
    except Exception as error:  # network, hub or cache errors all mean: not available here
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise QuantkitError(f"could not load openai/gsm8k from the hub or cache ({reason}); {offline_hint}") from None


def _file_documents(path: Path, text_column: str) -> list[str]:
    if not path.exists():
        raise QuantkitError(f"dataset file not found: {path}")
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise QuantkitError(f"cannot read {path}: {error}") from None
        return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return _column(_read_table(path), text_column, path)
    raise QuantkitError(f"unsupported dataset file type '{path.suffix}' ({path}); use .txt, .jsonl or .parquet")


def load_documents(spec: DatasetSpec) -> list[str]:
    """The dataset's documents (text), in file order."""
    if spec.name == "gsm8k":
        return _gsm8k_documents(spec.data_files)
    if spec.name == "text":
        if not spec.data_files:
            raise QuantkitError("--dataset text needs --data-files PATH")
        return [doc for f in spec.data_files for doc in _file_documents(Path(f), spec.text_column)]
    if spec.name.endswith(TEXT_SUFFIXES) or Path(spec.name).exists():
        return _file_documents(Path(spec.name), spec.text_column)
    raise QuantkitError(f"unknown dataset '{spec.name}'; use dummy, gsm8k, text (with --data-files) or a .txt/.jsonl/.parquet path")


def calibration_tokens(spec: DatasetSpec, tokenizer, vocab_size: int, num_samples: int, seq_len: int,
                       seed: int) -> torch.Tensor:
    """[num_samples, seq_len] int64 token ids, identical for identical arguments."""
    if num_samples < 1 or seq_len < 2:
        raise QuantkitError(f"need at least 1 sample of 2 tokens, got {num_samples} x {seq_len}")
    if spec.name == "dummy":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    documents = load_documents(spec)
    random.Random(seed).shuffle(documents)
    needed = num_samples * seq_len
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for start in range(0, len(documents), 256):
        chunk = documents[start:start + 256]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        available = len(stream) // seq_len
        raise QuantkitError(
            f"dataset {spec.name} gives {available} samples of {seq_len} tokens ({len(stream)} tokens in "
            f"{len(documents)} documents), fewer than the {num_samples} asked; lower --num-samples or --seq-len"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).reshape(num_samples, seq_len)
