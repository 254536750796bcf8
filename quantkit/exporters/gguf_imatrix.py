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

from quantkit.errors import QuantkitError, first_line

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
        raise QuantkitError(f"{path} is not a readable GGUF file ({first_line(error, typed=True)})") from None
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


@dataclass
class ImatrixExportResult:
    out: Path
    tensors: int                   # GGUF weight tensors with statistics
    chunk_count: int
    chunk_size: int
    notes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    def to_dict(self) -> dict:
        return {"out": str(self.out), "format": "imatrix", "tensors": self.tensors, "chunk_count": self.chunk_count,
                "chunk_size": self.chunk_size, "notes": self.notes, "size_bytes": self.size_bytes}


def export_imatrix(source_dir, out, *, overwrite: bool = False) -> ImatrixExportResult:
    """The importance statistics a calibration recorded, as llama-imatrix's file: per GGUF weight tensor the
    sum of its inputs' squares per column and the token count (experts stacked, one row each)."""
    from safetensors import safe_open

    from quantkit.exporters.source import ExportSource
    from quantkit.files import check_output_path, staged_file
    from quantkit.model.gguf_names import GGUFNames
    from quantkit.native.manifest import IN_COUNT, IN_SUM2

    out = Path(out)
    source = ExportSource.open(source_dir, require_manifest=True)
    manifest = source.manifest
    results = None if manifest.search_results is None else source.path / manifest.search_results
    if results is None or not results.is_file():
        raise QuantkitError(f"{source.path} has no search results file, so no importance statistics: it was "
                            "calibrated without data (rtn on every layer); calibrate with --algo imatrix, gptq or awq")
    with safe_open(str(results), "pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys() if key.endswith((IN_SUM2, IN_COUNT))}
    linears = [name for name in manifest.layers if f"{name}.{IN_SUM2}" in stored]
    if not linears:
        raise QuantkitError(f"{source.path} records no importance statistics (calibrated by a quantkit older than "
                            "the imatrix export, or without data); recalibrate to export them")
    names = GGUFNames.of(source.arch, source.num_blocks)
    stacks: dict[str, dict[int | None, str]] = {}
    for linear in linears:
        gguf_name, expert = names.linear_weight(linear)
        stacks.setdefault(gguf_name, {})[expert] = linear
    sums, counts = {}, {}
    experts = 1 if source.arch.experts is None else source.arch.experts.num_experts(source.config)
    for gguf_name, members in stacks.items():
        # one row per expert of a stacked tensor; an expert no token reached: zero sums and count 0 (llama.cpp's
        # loader then uses importance 1 for it, as for its own files)
        rows = 1 if None in members else experts
        width = next(iter(stored[f"{m}.{IN_SUM2}"] for m in members.values())).shape[0]
        sums[gguf_name] = torch.zeros(rows, width)
        counts[gguf_name] = torch.zeros(rows)
        for expert, linear in members.items():
            sums[gguf_name][expert or 0] = stored[f"{linear}.{IN_SUM2}"].float()
            counts[gguf_name][expert or 0] = stored[f"{linear}.{IN_COUNT}"].float().reshape(())
    calibration = manifest.calibration
    dataset = (calibration.dataset or {}).get("name", "quantkit calibration")
    matrix = ImportanceMatrix(sums, counts, [f"quantkit:{dataset}"], calibration.num_samples or 0,
                              calibration.seq_len or 0)
    notes = [f"{len(manifest.layers) - len(linears)} quantized linear(s) have no statistics (no token reached them)"] \
        if len(linears) < len(manifest.layers) else []
    if calibration.imatrix_from != "float" and calibration.propagate == "float":
        notes.append("statistics are of each Linear's input on the float model's block inputs, after smoothing/AWQ "
                     "scaling, with the block's earlier Linears quantized (true-sequential GPTQ) or of MoE experts "
                     "on every token, where llama-imatrix measures the float model as it is")
    elif calibration.imatrix_from != "float":
        notes.append("statistics are of each Linear's input as calibration quantized it (earlier blocks already "
                     "quantized, after smoothing/AWQ scaling), where llama-imatrix measures the float model "
                     "(calibrate --imatrix-from float records that)")
    check_output_path(out, overwrite, [source.path])
    with staged_file(out, overwrite) as staging:
        write_imatrix(staging, matrix)
    return ImatrixExportResult(out.resolve(), len(sums), matrix.chunk_count, matrix.chunk_size, notes,
                               out.stat().st_size)

