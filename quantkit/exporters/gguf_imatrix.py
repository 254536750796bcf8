"""llama.cpp's importance-matrix files (``llama-imatrix -o model.imatrix.gguf``), read and written.

A GGUF file with ``general.type = "imatrix"``, the keys ``imatrix.datasets`` (array of strings),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32), and per weight tensor ``W`` (GGUF name):
  W.in_sum2   F32 [n_mat, n]   sum over the calibration tokens of x_j^2 for the input x of W (per expert)
  W.counts    F32 [n_mat, 1]   the number of tokens summed (per expert)
(tools/imatrix/imatrix.cpp ``save_imatrix``, common/imatrix-loader.cpp). llama-quantize --imatrix uses
importance_j = in_sum2_j / count (float32), 1 for an expert with no tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError

DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class ImportanceMatrix:
    """sums: GGUF weight name -> [n_mat, n] float32 sums of squares; counts: name -> [n_mat] float32 tokens."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str, expert: int = 0) -> torch.Tensor | None:
        """[n] float32 per-column importance of tensor ``name`` as llama-quantize computes it, or None."""
        if name not in self.sums:
            return None
        count = self.counts[name][expert]
        if float(count) <= 0:
            return torch.ones_like(self.sums[name][expert])
        return self.sums[name][expert] / count


def read_imatrix(path) -> ImportanceMatrix:
    """An imatrix GGUF file (llama-imatrix's current format); anything else is one clear error."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"imatrix file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as error:   # gguf-py raises ValueError/OSError/struct errors on damaged files
        raise QuantkitError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise QuantkitError(f"{path} is a GGUF file but not an importance matrix (general.type is "
                            f"{kind.contents() if kind else 'missing'}); the legacy .dat format is not read")
    sums, counts = {}, {}
    for tensor in reader.tensors:
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name.removesuffix(".in_sum2")] = data.reshape(-1, int(tensor.shape[0]))
        elif tensor.name.endswith(".counts"):
            counts[tensor.name.removesuffix(".counts")] = data.reshape(-1)
    unmatched = set(sums) ^ set(counts)
    if unmatched:
        raise QuantkitError(f"{path}: tensor {sorted(unmatched)[0]} has sums without counts or counts without sums")

    def field_value(key, default):
        return reader.fields[key].contents() if key in reader.fields else default

    return ImportanceMatrix(sums, counts, list(field_value(DATASETS_KEY, [])), int(field_value(CHUNK_COUNT_KEY, 0)),
                            int(field_value(CHUNK_SIZE_KEY, 0)))


def write_imatrix(path, matrix: ImportanceMatrix) -> None:
    """Write ``matrix`` in llama-imatrix's format (llama-quantize --imatrix reads it)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="imatrix")
    # gguf-py always adds general.architecture; llama-imatrix's files have none (its loader ignores it)
    for shard in writer.kv_data:
        shard.pop("general.architecture", None)
    try:
        writer.add_string("general.type", "imatrix")
        writer.add_array(DATASETS_KEY, list(matrix.datasets))
        writer.add_uint32(CHUNK_COUNT_KEY, matrix.chunk_count)
        writer.add_uint32(CHUNK_SIZE_KEY, matrix.chunk_size)
        for name in sorted(matrix.sums):
            writer.add_tensor(f"{name}.in_sum2", matrix.sums[name].float().numpy())
            writer.add_tensor(f"{name}.counts", matrix.counts[name].float().reshape(-1, 1).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
