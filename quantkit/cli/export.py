"""``quantkit export``: a quantkit output directory as GGUF (llama.cpp), compressed-tensors (vLLM), an
importance matrix (llama-imatrix's .gguf) or llama2.c's int8 model file (`quantkit.api.export`)."""
from __future__ import annotations

from pathlib import Path

import click

from quantkit.api import EXPORT_FORMATS as FORMATS
from quantkit.cli.choice import Choice

GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
              "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q3_K", "Q4_K", "Q5_K")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--format", "export_format", required=True, type=Choice(FORMATS),
              help="gguf: one .gguf file for llama.cpp/ollama/LM Studio; compressed-tensors: a directory for "
                   "vLLM/transformers; imatrix: the calibration's importance statistics as llama-imatrix's .gguf "
                   "(for llama-quantize --imatrix); llama2c: llama2.c's int8 model file (version 2, for runq.c) "
                   "plus its tokenizer.bin.")
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
@click.option("--dataset", help="Calibration data (gsm8k, text, dummy, a .txt/.jsonl file; as calibrate reads it). "
              "With --target-size: measure each block Linear's sensitivity to each candidate on it, relative to the "
              "residual stream as calibrate --target-bits does, instead of its importance-weighted weight error; "
              "with --algo: what the algorithm calibrates on.")
@click.option("--data-files", multiple=True, help="With --dataset: local files for gsm8k/text (offline use).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--num-samples", default=64, show_default=True, type=int, help="With --dataset: calibration samples.")
@click.option("--seq-len", default=512, show_default=True, type=int, help="With --dataset: tokens per sample.")
@click.option("--algo", "algorithm", help="GGUF of a float checkpoint, with --dataset: once each block Linear's type "
              "is chosen (--type, --target-size), quantize it on that type's grid with this calibration algorithm "
              "(gptq, imatrix, awq, signround, ...) and write those codes, in one command.")
@click.option("--algo-option", "algo_options", multiple=True, metavar="KEY=VALUE",
              help="With --algo: an option of the algorithm (as calibrate takes it), repeatable.")
@click.option("--propagate", type=Choice(["quantized", "float"]), default="quantized", show_default=True,
              help="With --algo: each block's calibration inputs, as calibrate --propagate takes them (float: one "
                   "forward pass per block instead of two; as good on Q4_K_M, worse on coarse grids).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .gguf file or directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress or tables.")
def export(directory, export_format, ggml_type, imatrix, target_size, candidates, dataset, data_files, text_column,
           num_samples, seq_len, algorithm, algo_options, propagate, out, overwrite, as_json, quiet):
    """Export DIRECTORY (a quantkit output directory; for GGUF also a float HF checkpoint)."""
    from quantkit import api
    from quantkit.cli import render
    from quantkit.cli.calibrate import parse_algo_options

    def run(progress=None):
        return api.export(directory, format=export_format, out=out, type=ggml_type, imatrix=imatrix,
                          target_size=target_size, candidates=candidates, dataset=dataset, data_files=data_files,
                          text_column=text_column, num_samples=num_samples, seq_len=seq_len, algo=algorithm,
                          algo_options=parse_algo_options(algo_options) or None, propagate=propagate,
                          overwrite=overwrite, progress=progress)

    if quiet or as_json:
        result = run()
    elif dataset is not None:       # the sensitivity pass: per-block progress, as calibrate shows it
        with render.RichProgress() as progress:
            result = run(progress)
            progress.finish()
    else:
        with render.stderr.status(f"exporting {directory} as {export_format}..."):
            result = run()
    if as_json:
        render.emit_json(result.to_dict())
    elif not quiet:
        if export_format == "imatrix":
            render.stderr.print(f"{result.tensors} weight tensors' importance statistics "
                                f"({result.chunk_count} chunks of {result.chunk_size} tokens)")
        else:
            tables = {"gguf": _gguf_table, "compressed-tensors": _ct_table, "llama2c": _llama2c_table}
            render.stderr.print(tables[export_format](result))
        for note in result.notes:
            render.stderr.print(f"note: {note}")
        render.stderr.print(f"wrote {result.out} ({result.size_bytes / 2**20:.1f} MiB)")


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


def _llama2c_table(result):
    from rich.table import Table

    table = Table(title=f"quantkit export -> {result.out.name} (llama2.c version 2, int8 groups of {result.group_size}, "
                        f"tokenizer {result.tokenizer.name})")
    for column in ("tensors", "status", "why", "min weight SQNR dB"):
        table.add_column(column, justify="right" if column in ("tensors", "min weight SQNR dB") else "left")
    for status, count, reason, sqnr in result.describe():
        table.add_row(str(count), status, reason, "" if sqnr is None else "exact" if sqnr == float("inf") else f"{sqnr:.1f}")
    return table
