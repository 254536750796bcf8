"""``quantkit inspect``: per-layer weight, activation and error statistics, as a short table and an HTML report."""
from __future__ import annotations

import math
from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write a self-contained HTML report here (needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing report quantkit wrote.")
@click.option("--rows", default=10, show_default=True, type=click.IntRange(1), help="Layers in the printed table.")
@click.option("--json", "as_json", is_flag=True, help="Print every statistic as JSON on stdout.")
def inspect(path, out, overwrite, rows, as_json):
    """Statistics of PATH (a checkpoint directory or a quantkit output): per Linear weight |w| percentiles and
    outlier channels; for outputs also the calibration's activation outliers, SmoothQuant's alphas and the
    layers where the quantization error concentrates."""
    from quantkit import api
    from quantkit.cli import render

    if as_json:
        render.emit_json(api.inspect(path, out=out, overwrite=overwrite).to_dict())
        return
    with render.stderr.status(f"inspecting {path}..."):
        report = api.inspect(path, out=out, overwrite=overwrite)
    render.stdout.print(_table(report, rows))
    for line in _summary(report):
        render.stdout.print(line, markup=False)
    if out is not None:
        render.stderr.print(f"wrote {out}")


def _short(name: str) -> str:
    """model.layers.3.self_attn.q_proj -> 3.self_attn.q_proj (the table's first column stays narrow)."""
    for prefix in ("model.language_model.layers.", "model.layers."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _db(value) -> str:
    return "-" if value is None else "exact" if value == math.inf else f"{value:.1f}"


def _table(report, count: int):
    from rich.table import Table

    weights = {w.name: w for w in report.weights}
    if report.quality:
        measured = "output" if any(row.output_sqnr_db is not None for row in report.quality) else "weight"
        table = Table(title=f"{report.path.name}: the {min(count, len(report.quality))} Linears with the lowest "
                            f"{measured} SQNR")
        for column in ("layer", "grid", "algo", "weight SQNR dB", "output SQNR dB", "|w| max", "outlier cols"):
            table.add_column(column, justify="left" if column in ("layer", "grid", "algo") else "right")
        for row in report.worst(count):
            stats = weights[row.name]
            table.add_row(_short(row.name), row.grid, row.algorithm, _db(row.weight_sqnr_db),
                          _db(row.output_sqnr_db), f"{stats.absmax:.3g}", str(stats.outlier_count))
        return table
    table = Table(title=f"{report.path.name}: the {min(count, len(report.weights))} Linears with the largest |w|")
    for column in ("layer", "shape", "|w| max", "p99.9", "p50", "outlier cols", "largest"):
        table.add_column(column, justify="left" if column in ("layer", "largest") else "right")
    for stats in sorted(report.weights, key=lambda w: -w.absmax)[:count]:
        table.add_row(_short(stats.name), "x".join(map(str, stats.shape)), f"{stats.absmax:.3g}", f"{stats.p999:.3g}",
                      f"{stats.p50:.3g}", str(stats.outlier_count), ", ".join(map(str, stats.outlier_channels[:4])))
    return table


def _summary(report) -> list[str]:
    lines = [f"{report.kind}, {report.architecture}: {len(report.weights)} Linears; "
             f"{sum(w.outlier_count > 0 for w in report.weights)} with outlier weight columns"]
    if report.activations:
        worst = max(report.activations, key=lambda a: a.absmax)
        lines.append(f"activations: {sum(a.outlier_count > 0 for a in report.activations)} of "
                     f"{len(report.activations)} Linears' inputs have outlier channels; largest max |x| "
                     f"{worst.absmax:.4g} ({worst.name}, channel {worst.outlier_channels[0] if worst.outlier_channels else '-'}"
                     f"{', before SmoothQuant/AWQ scaling' if worst.before_scaling else ''})")
    if report.block_alpha:
        applied = [a for a in report.block_alpha.values() if a is not None]
        lines.append(f"smoothing: {len(applied)} of {len(report.block_alpha)} blocks smoothed"
                     + (f", alpha {min(applied):g}..{max(applied):g}" if applied else ""))
    lines += [f"note: {note}" for note in report.notes]
    return lines
