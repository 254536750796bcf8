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

import difflib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from quantkit.errors import QuantkitError, first_line

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DATASET_NAMES = ("dummy", "gsm8k", "text")


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
        raise QuantkitError(f"cannot read {path}: {first_line(error, typed=True)}") from None


def _columns_of(rows: list[dict], path) -> list[str]:
    if rows and not isinstance(rows[0], dict):
        raise QuantkitError(f"{path} holds {type(rows[0]).__name__} rows, not JSON objects with named columns")
    return list(rows[0]) if rows else []


def _column(rows: list[dict], column: str, path) -> list[str]:
    columns = _columns_of(rows, path)
    if rows and column not in columns:
        raise QuantkitError(f"{path} has no column '{column}' (columns: {', '.join(columns)}); use --text-column")
    return [str(row[column]) for row in rows if row.get(column)]


GSM8K_COLUMNS = ("question", "answer")
_GSM8K_HINT = "pass --data-files PATH to a local gsm8k .jsonl or .parquet (columns question, answer)"


def _gsm8k_documents(data_files: tuple[str, ...]) -> list[str]:
    if data_files:
        rows = []
        for file in data_files:
            table = _read_table(Path(file))
            missing = [c for c in GSM8K_COLUMNS if table and c not in _columns_of(table, file)]
            if missing:
                raise QuantkitError(f"{file} has no column '{missing[0]}' (columns: {', '.join(_columns_of(table, file))});"
                                    " gsm8k needs the columns question and answer")
            rows.extend(table)
    else:
        rows = _gsm8k_from_hub()
    return [f"{row['question']}\n{row['answer']}" for row in rows]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds; without this,
    an unreachable network costs ~30 s of the datasets library's retries before the same error."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _gsm8k_from_hub() -> list[dict]:
    """openai/gsm8k's train split from the hub, or from the local datasets cache when offline (then
    without touching the network, so a missing copy fails at once)."""
    import datasets
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if offline or not _hub_reachable():
        why = "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else "the hub cannot be reached"
        try:
            with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
                    mock.patch.object(constants, "HF_HUB_OFFLINE", True):
                return list(datasets.load_dataset("openai/gsm8k", "main", split="train"))
        except Exception:  # not in the cache
            raise QuantkitError(f"gsm8k is not available offline: {why} and the local datasets cache has no copy; "
                                f"{_GSM8K_HINT}") from None
    try:
        return list(datasets.load_dataset("openai/gsm8k", "main", split="train"))
    except Exception as error:  # network, hub or cache errors all mean: not available here
        reason = first_line(error, 160)
        raise QuantkitError(f"could not load openai/gsm8k from the hub or cache ({reason}); {_GSM8K_HINT}") from None


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
    close = difflib.get_close_matches(spec.name, DATASET_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise QuantkitError(f"unknown dataset '{spec.name}'; {hint}use dummy, gsm8k, text (with --data-files) or a "
                        ".txt/.jsonl/.parquet path")


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
    tokens = torch.tensor(stream[:needed], dtype=torch.long).reshape(num_samples, seq_len)
    check_token_range(tokens, tokenizer, vocab_size)
    return tokens


def check_token_range(tokens: torch.Tensor, tokenizer, vocab_size: int) -> None:
    """Every id indexes a row of the model's embedding (an id past it crashes or reads garbage)."""
    largest = int(tokens.max()) if tokens.numel() else -1
    if largest >= vocab_size:
        raise QuantkitError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size} "
                            f"rows (vocab_size): token id {largest} is out of range; is it the model's own tokenizer?")
