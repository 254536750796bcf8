"""``quantkit export``: a quantkit output directory as GGUF (llama.cpp) or compressed-tensors (vLLM)."""
from __future__ import annotations

import functools
from pathlib import Path

import click

FORMATS = ("gguf", "compressed-tensors", "imatrix")
GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
              "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q3_K", "Q4_K", "Q5_K")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--format", "export_format", required=True, type=click.Choice(FORMATS),
              help="gguf: one .gguf file for llama.cpp/ollama/LM Studio; compressed-tensors: a directory for "
                   "vLLM/transformers; imatrix: the calibration's importance statistics as llama-imatrix's .gguf "
                   "(for llama-quantize --imatrix).")
@click.option("--type", "ggml_type", metavar="TYPE",
              help="GGUF only: type for layers whose codes no GGUF block holds exactly (and for every linear of "
                   "a float checkpoint), or a llama.cpp K-quant file type (Q4_K_M, ...) choosing each tensor's "
                   "type as llama-quantize does: " + ", ".join(GGUF_TYPES) + ". Default: closest to each layer's "
                   "bits.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="GGUF only: a llama.cpp importance matrix (llama-imatrix's .gguf); K-quant tensors are searched "
                   "under it as llama-quantize --imatrix does.")
@click.option("--target-size", help="GGUF of a float checkpoint: choose each block Linear's type so that the file "
              "is at most this size (80MB, 1.2GB, 800MiB or bytes); other tensors get --type's choice (F16 without).")
@click.option("--candidates", help="With --target-size: the GGUF types allowed, comma-separated (default Q2_K..Q6_K, "
              "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .gguf file or directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress or tables.")
def export(directory, export_format, ggml_type, imatrix, target_size, candidates, out, overwrite, as_json, quiet):
    """Export DIRECTORY (a quantkit output directory; for GGUF also a float HF checkpoint)."""
    from quantkit.cli import render
    from quantkit.errors import QuantkitError

    if (ggml_type is not None or imatrix is not None or target_size is not None) and export_format != "gguf":
        raise QuantkitError("--type, --imatrix and --target-size apply to --format gguf only")
    if candidates is not None and target_size is None:
        raise QuantkitError("--candidates lists the types --target-size chooses from; give --target-size")
    run = {"gguf": _gguf, "compressed-tensors": _compressed_tensors, "imatrix": _imatrix}[export_format]
    if export_format == "gguf":
        run = functools.partial(_gguf, target_size=target_size, candidates=candidates)
    if quiet or as_json:
        result = run(directory, out, ggml_type, overwrite, imatrix)
    else:
        with render.stderr.status(f"exporting {directory} as {export_format}..."):
            result = run(directory, out, ggml_type, overwrite, imatrix)
    if as_json:
        render.emit_json(result.to_dict())
    elif not quiet:
        if export_format != "imatrix":
            render.stderr.print(_gguf_table(result) if export_format == "gguf" else _ct_table(result))
        else:
            render.stderr.print(f"{result.tensors} weight tensors' importance statistics "
                                f"({result.chunk_count} chunks of {result.chunk_size} tokens)")
        for note in result.notes:
            render.stderr.print(f"note: {note}")
        render.stderr.print(f"wrote {result.out} ({result.size_bytes / 2**20:.1f} MiB)")


def _gguf(directory, out, ggml_type, overwrite, imatrix, target_size=None, candidates=None):
    from quantkit.exporters import gguf_budget
    from quantkit.exporters.gguf import export_gguf
    from quantkit.run.budget import parse_size

    return export_gguf(directory, out, ggml_type=ggml_type.upper() if ggml_type else None, overwrite=overwrite,
                       imatrix=imatrix, target_size=None if target_size is None else parse_size(target_size),
                       candidates=gguf_budget.parse_candidates(candidates))


def _compressed_tensors(directory, out, ggml_type, overwrite, imatrix):
    from quantkit.exporters.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(directory, out, overwrite=overwrite)


def _imatrix(directory, out, ggml_type, overwrite, imatrix):
    from quantkit.exporters.gguf_imatrix import export_imatrix

    return export_imatrix(directory, out, overwrite=overwrite)


def _gguf_table(result):
    from rich.table import Table

    from quantkit.exporters.gguf import describe

    table = Table(title=f"quantkit export -> {result.out.name} ({result.architecture}, {result.file_type}, "
                        f"tokenizer {result.tokenizer})")
    for column in ("linear layers", "status", "GGUF type", "why", "min weight SQNR dB"):
        table.add_column(column, justify="right" if column in ("linear layers", "min weight SQNR dB") else "left")
    for status, ggml_type, count, reason, sqnr in describe(result):
        table.add_row(str(count), status, ggml_type, reason, "" if sqnr is None else f"{sqnr:.1f}")
    return table


def _ct_table(result):
    from rich.table import Table

    table = Table(title=f"quantkit export -> {result.out.name} (compressed-tensors, {result.format})")
    for column in ("group", "format", "scheme", "linear layers"):
        table.add_column(column, justify="right" if column == "linear layers" else "left")
    for name, group in result.groups.items():
        table.add_row(name, group["format"], group["scheme"], str(group["layers"]))
    table.add_row("ignore", "", "float", str(len(result.ignore)))
    return table
