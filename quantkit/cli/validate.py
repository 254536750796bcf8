"""``quantkit validate DIR``: every quantized layer through the kernels, checked against references."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click

from quantkit.cli.choice import Choice

_MAX_ROWS = 40


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--backend", default="auto", show_default=True,
              type=Choice(["auto", "triton", "interpreter", "reference"]),
              help="auto: Triton kernels on a GPU, else the pure-torch reference ops; interpreter: the Triton "
                   "kernels in Triton's CPU interpreter (slow).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True,
              help="Activation dtype: auto (fp32 on CPU, the storage fp16/bf16 on CUDA), float32, float16, bfloat16.")
@click.option("--num-samples", type=int, help="Calibration samples to regenerate (default: up to 4).")
@click.option("--seq-len", type=int, help="Tokens per sample (default: the calibration sequence length).")
@click.option("--sqnr-margin", default=10.0, show_default=True, type=float,
              help="dB a layer's SQNR vs its float layer may fall below the value calibration recorded.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Print nothing unless validation fails.")
def validate(directory, backend, device, dtype, num_samples, seq_len, sqnr_margin, as_json, quiet):
    """Run the quantized model in DIRECTORY through the kernels on regenerated calibration activations;
    compare every layer with the pure-torch reference and the float source; write validation.json and a
    summary into the manifest. Exits non-zero naming the layer when a check fails."""
    if backend == "interpreter":
        # Triton builds its interpreter helpers at import: the switch must precede the first import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from quantkit import api
    from quantkit.cli import render

    def run(on_stage=None):
        return api.validate(directory, backend=backend, device=device, dtype=dtype, num_samples=num_samples,
                            seq_len=seq_len, sqnr_margin=sqnr_margin, raise_on_failure=False, on_stage=on_stage)

    if quiet or as_json:
        report = run()
    else:
        with render.stderr.status("validating...") as status:
            report = run(lambda name: status.update(f"validating: {name}"))
    if as_json:
        render.emit_json(report.to_dict())
    elif not quiet:
        render.stdout.print(_layer_table(report))
        render.stdout.print(_summary_lines(report))
    if not report.passed:
        raise api.validation_error(report, directory)


def _db(value) -> str:
    if value is None:
        return "-"
    return "exact" if value == math.inf else f"{value:.1f}"


def _layer_table(report):
    from rich.table import Table

    table = Table(title=f"quantkit validate: {report.backend_description}",
                  caption=f"{len(report.layers)} layers, {report.dtype} activations on {report.device}; "
                          f"activations: {report.activations['source']}")
    for column in ("layer", "scheme", "kernel", "max rel err", "SQNR vs ref", "SQNR vs float", "expected >=",
                   "weight SQNR", "status"):
        table.add_column(column, justify="left" if column in ("layer", "scheme", "kernel", "status") else "right")
    rows = list(report.layers.values())
    if len(rows) > _MAX_ROWS:   # failures first, then the lowest SQNR against the float layer
        rows.sort(key=lambda r: (r.passed, r.kernel_float_sqnr_db if r.kernel_float_sqnr_db is not None else math.inf))
        rows = rows[:_MAX_ROWS]
    for row in rows:
        table.add_row(row.name, row.scheme, row.kernel, f"{row.kernel_max_rel_error:.2e}", _db(row.kernel_sqnr_db),
                      _db(row.kernel_float_sqnr_db), _db(row.expected_min_sqnr_db), _db(row.weight_sqnr_db),
                      "ok" if row.passed else "[red]FAIL[/red]")
    return table


def _summary_lines(report) -> str:
    e2e = report.end_to_end
    lines = [f"float reference: {report.float_reference}"]
    if "kernel_kl_divergence" in e2e:
        lines.append(f"end to end vs source ({e2e['tokens']} tokens): kernels KL {e2e['kernel_kl_divergence']:.5f}, "
                     f"top-1 {100 * e2e['kernel_top1_agreement']:.2f}%; reference KL "
                     f"{e2e['reference_kl_divergence']:.5f}, top-1 {100 * e2e['reference_top1_agreement']:.2f}%")
    lines.append(f"kernels vs reference model: KL {e2e['kernel_vs_reference_kl_divergence']:.2g}, "
                 f"top-1 {100 * e2e['kernel_vs_reference_top1_agreement']:.2f}%, "
                 f"max |logit diff| {e2e['kernel_vs_reference_max_abs_logit_diff']:.3g}")
    lines.append(("[green]passed[/green]" if report.passed else f"[red]{len(report.failures)} failure(s)[/red]") +
                 f" in {report.seconds:.1f} s")
    return "\n".join(lines)
