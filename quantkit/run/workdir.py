"""The work directory of a calibration run: committed blocks, the next block's inputs, progress.

    OUT_PARENT/.OUT_NAME.partial/
        run.json                        fingerprint of every setting that changes the result
        progress.json                   {"next_block": k}: blocks < k are committed
        blocks/block-00003.safetensors  block 3's tensors, under their final names
        blocks/block-00003.json         its manifest entries, chosen alpha and timings
        blocks/search-00003.safetensors its search results (SmoothQuant factors, AWQ scales, ...)
        activations-rank0.safetensors   the inputs of block `next_block` (hidden states per batch)
        activations-float-rank0.safetensors  its float-stream inputs (the float model's), when the run keeps them

Every file is written to a temporary name and renamed, and progress.json last, so a run killed at
any instant leaves a consistent state: `--resume` continues from the first unfinished block with the
very tensors an uninterrupted run would have used. At the end the block files become the shards of
the output (merged into one model.safetensors when small) and the directory is renamed to OUT.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.files import (
    DEFAULT_SHARD_BYTES,
    atomic_json,
    atomic_safetensors,
    describe_existing,
    fsync_tree,
    name_shards,
    replace_into_place,
    writing,
)


def committed_blocks(out: Path) -> int:
    """How many blocks an interrupted run for ``out`` has committed (0 when there is none)."""
    progress = work_path(out) / "progress.json"
    try:
        return int(json.loads(progress.read_text())["next_block"]) if progress.is_file() else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def work_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def check_committed_work(out: Path, resume: bool, overwrite: bool) -> None:
    """A new run must not silently throw away the committed blocks of an interrupted one, nor delete
    a work directory quantkit did not create."""
    path = work_path(out)
    if not path.exists():
        return
    if not path.is_dir() or (any(path.iterdir()) and not (path / "run.json").is_file()):
        raise QuantkitError(f"{path} is in the way of the run's work directory and was not written by quantkit; "
                            "move it away or choose another --out")
    committed = committed_blocks(out)
    if committed and not resume and not overwrite:
        raise QuantkitError(f"{committed} committed block{'s' if committed != 1 else ''} of an interrupted run "
                            f"found in {path}; use --resume to keep them, or --overwrite to start over")


class WorkDir:
    def __init__(self, out: Path, fingerprint: dict, *, rank: int = 0, writer: bool = True):
        self.out = Path(out).absolute()
        self.path = work_path(self.out)
        self.fingerprint = fingerprint
        self.rank = rank
        self.writer = writer           # only one process (rank 0) writes block files and the output
        self.blocks = self.path / "blocks"

    # start / resume ------------------------------------------------------------------------------

    def start(self, resume: bool, overwrite: bool = False) -> int:
        """Prepare the directory and return the first block to compute (0 unless resuming)."""
        with writing(self.path):
            if resume and (self.path / "progress.json").is_file():
                recorded = json.loads((self.path / "run.json").read_text())
                if recorded != self.fingerprint:
                    changed = sorted(k for k in set(recorded) | set(self.fingerprint)
                                     if recorded.get(k) != self.fingerprint.get(k))
                    raise QuantkitError(f"--resume: the interrupted run in {self.path} used other settings "
                                        f"({', '.join(changed)}); rerun without --resume to start over")
                return int(json.loads((self.path / "progress.json").read_text())["next_block"])
            if self.writer:
                check_committed_work(self.out, resume, overwrite)
                if self.path.exists():
                    shutil.rmtree(self.path)
                self.blocks.mkdir(parents=True)
                atomic_json(self.path / "run.json", self.fingerprint)
        return 0

    @property
    def resumable(self) -> bool:
        return (self.path / "progress.json").is_file()

    # per block ------------------------------------------------------------------------------------

    def commit_block(self, index: int, tensors: dict[str, torch.Tensor], record: dict,
                     search_results: dict[str, torch.Tensor], next_inputs: list[torch.Tensor] | None,
                     next_float_inputs: list[torch.Tensor] | None = None) -> None:
        """Persist one finished block; progress.json moves on only after everything else is on disk."""
        with writing(self.path):
            self._commit_block(index, tensors, record, search_results, next_inputs, next_float_inputs)

    def _commit_block(self, index, tensors, record, search_results, next_inputs, next_float_inputs) -> None:
        for stream, hidden in (("", next_inputs), ("float-", next_float_inputs)):
            if hidden is not None:
                atomic_safetensors(self.path / f"activations-{stream}rank{self.rank}.safetensors",
                                   {f"batch_{i}": h for i, h in enumerate(hidden)})
        if not self.writer:
            return
        atomic_safetensors(self.blocks / f"block-{index:05d}.safetensors", tensors)
        if search_results:
            atomic_safetensors(self.blocks / f"search-{index:05d}.safetensors", search_results)
        atomic_json(self.blocks / f"block-{index:05d}.json", record)
        atomic_json(self.path / "progress.json", {"next_block": index + 1})

    def offloaded(self, block: int, batch: int) -> Path:
        """The file holding batch ``batch`` of block ``block``'s inputs (--offload-activations)."""
        directory = self.path / f"offload-rank{self.rank}"
        directory.mkdir(exist_ok=True)
        return directory / f"block{block:05d}-batch{batch:05d}.safetensors"

    def drop_offloaded(self, block: int) -> None:
        """Delete the inputs of a committed block (the next block's inputs are already on disk)."""
        for path in (self.path / f"offload-rank{self.rank}").glob(f"block{block:05d}-*.safetensors"):
            path.unlink()

    def saved_inputs(self, float_stream: bool = False) -> list[torch.Tensor]:
        """The hidden states saved with the last committed block (the next block's inputs, or with
        ``float_stream`` its float-stream inputs)."""
        path = self.path / f"activations-{'float-' if float_stream else ''}rank{self.rank}.safetensors"
        if not path.is_file():
            raise QuantkitError(f"--resume: {path} is missing; rerun without --resume")
        tensors = load_file(str(path))
        return [tensors[f"batch_{i}"] for i in range(len(tensors))]

    def block_record(self, index: int) -> dict:
        return json.loads((self.blocks / f"block-{index:05d}.json").read_text())

    def block_search_results(self, index: int) -> dict[str, torch.Tensor]:
        path = self.blocks / f"search-{index:05d}.safetensors"
        return load_file(str(path)) if path.is_file() else {}

    # finish ---------------------------------------------------------------------------------------

    def finish(self, num_blocks: int, rest: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
        """Turn the block files (and ``rest``: embeddings, final norm, lm_head) into the output's
        weight files: one model.safetensors when everything fits one shard, else numbered shards
        (a block each, plus one for the rest) with model.safetensors.index.json."""
        with writing(self.path):
            return self._finish(num_blocks, rest, max_shard_bytes)

    def _finish(self, num_blocks: int, rest: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
        parts = [self.blocks / f"block-{i:05d}.safetensors" for i in range(num_blocks)]
        rest_path = self.blocks / "rest.safetensors"
        atomic_safetensors(rest_path, rest)
        parts.append(rest_path)
        if sum(p.stat().st_size for p in parts) <= max_shard_bytes:
            merged: dict[str, torch.Tensor] = {}
            for part in parts:
                merged.update(load_file(str(part)))
            single = self.path / "merged.safetensors"
            save_file(merged, str(single), metadata={"format": "pt"})
            return name_shards(self.path, [(single, list(merged))])
        named = []
        for part in parts:
            with safe_open(str(part), "pt") as handle:
                named.append((part, list(handle.keys())))
        return name_shards(self.path, named)

    def publish(self, overwrite: bool) -> None:
        """Remove the bookkeeping and rename the directory to OUT (replacing a quantkit output only with
        overwrite)."""
        if self.out.exists() and overwrite and describe_existing(self.out) is not None:
            # refuse before the bookkeeping goes, so that the finished blocks stay resumable
            raise QuantkitError(f"refusing to replace {self.out}: it became {describe_existing(self.out)} "
                                f"while working; the finished run is kept in {self.path} (rerun with --resume)")
        leftovers = [p.name for p in self.path.glob("activations-*")] + [p.name for p in self.path.glob("offload-*")]
        for leftover in ["blocks", "run.json", "progress.json", *leftovers]:
            target = self.path / leftover
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        with writing(self.out):
            fsync_tree(self.path)
            replace_into_place(self.path, self.out, overwrite)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
