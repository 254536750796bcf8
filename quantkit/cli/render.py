"""rich rendering: stage progress, per-block bars and summary tables. Lives only in the CLI."""
from __future__ import annotations

import json
import math
import re

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from quantkit.run.pipeline import Progress as PipelineProgress

stderr = Console(stderr=True)
stdout = Console()


def emit_json(data: dict) -> None:
    """Machine-readable output: one JSON document on stdout, nothing else there."""
    print(json.dumps(data, indent=2, default=str))


class RichProgress(PipelineProgress):
    """Shows each stage as a line and the decoder blocks as a bar with the worst layer so far."""

    def __init__(self, console: Console = stderr):
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=console, transient=True)
        self.tasks: dict[str, int] = {}
        # the worst layer so far by output SQNR, or by weight SQNR in a run that measures no output figures
        self.worst = {"output": (math.inf, ""), "weight": (math.inf, "")}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def _close_open_stages(self) -> None:
        for task_id in self.tasks.values():
            task = self.bar.tasks[task_id]
            if task.total is None:
                self.bar.update(task_id, total=1, completed=1)

    def stage(self, name: str, total: int | None = None) -> None:
        self._close_open_stages()
        self.tasks[name] = self.bar.add_task(name, total=total, detail="")

    def advance(self, name: str, detail: str = "") -> None:
        kind = "output" if self.worst["output"][1] else "weight"
        value, layer = self.worst[kind]
        worst = f"worst {kind} SQNR {value:.1f} dB ({layer})" if layer else ""
        self.bar.update(self.tasks[name], advance=1, detail=f"{detail}  {worst}")

    def step(self, name: str, done: int, total: int, detail: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(name, total=total, detail="")
        self.bar.update(self.tasks[name], completed=done, detail=detail)

    def block_done(self, index: int, layers: dict[str, dict]) -> None:
        for name, metrics in layers.items():
            for kind in self.worst:
                value = metrics.get(f"{kind}_sqnr_db")
                if value is not None and value < self.worst[kind][0]:
                    self.worst[kind] = (value, name)
        for name in [n for n in self.tasks if n.startswith(f"block {index} ")]:   # its refinement's steps
            self.bar.update(self.tasks[name], visible=False)
        losses = {(m["block_loss_before"], m["block_loss_after"]) for m in layers.values() if "block_loss_before" in m}
        for before, after in sorted(losses):
            change = f"{100 * (after / before - 1):+.1f}%" if before > 0 else ""
            self.bar.console.print(f"block {index}: signround block loss {before:.3g} -> {after:.3g} {change}")

    def estimate(self, estimate) -> None:
        self.bar.console.print(estimate.describe())

    def finish(self) -> None:
        self._close_open_stages()


def _db(value) -> str:
    return "exact" if value is None or value == math.inf else f"{value:.1f}"


def calibration_table(result) -> Table:
    manifest = result.manifest
    table = Table(title=f"quantkit calibrate -> {result.out}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for stage, seconds in result.timings.items():
        table.add_row(f"time: {stage}", f"{seconds:.2f} s")
    if result.overlapped_seconds:
        table.add_row("time: quantize beside observe", f"{result.overlapped_seconds:.2f} s (in both stages' times)")
    table.add_row("time: total", f"{result.total_seconds:.2f} s")
    table.add_row("peak memory (RSS)", f"{result.peak_rss_bytes / 2**20:.0f} MiB")
    layers = manifest.layers
    table.add_row("layers quantized", str(len(layers)))
    for metric in ("output_sqnr_db", "weight_sqnr_db"):
        values = [(e.metrics.get(metric), n) for n, e in layers.items() if e.metrics.get(metric) is not None]
        if values:
            worst, best = min(values), max(values)
            table.add_row(f"{metric} worst", f"{_db(worst[0])} ({worst[1]})")
            table.add_row(f"{metric} best", f"{_db(best[0])} ({best[1]})")
    ratios = sorted(after / before for before, after in block_losses(manifest).values() if before > 0)
    if ratios:
        table.add_row("signround block loss after / before", f"median {ratios[len(ratios) // 2]:.3f}, "
                                                             f"range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    fit = manifest.summary.final_norm
    if fit:
        table.add_row("final norm fit: KL before -> after",
                      f"{fit['kl_before']:.4g} -> {fit['kl_after']:.4g}" + ("" if fit["kept"] else " (source kept)"))
    allocation = manifest.allocation
    if allocation:
        achieved, target = allocation.achieved, allocation.target
        asked = f"{target['bits']} bits" if "bits" in target else f"{target['size_bytes'] / 1e6:.1f} MB"
        table.add_row("allocation target", f"{asked} ({allocation.sensitivity} sensitivity)")
        table.add_row("allocation achieved", f"{achieved.bits:.4f} bits per weight, "
                                             f"weight files {achieved.weight_file_bytes / 1e6:.2f} MB")
        table.add_row("allocation grids", ", ".join(f"{label} x{n}" for label, n in allocation.chosen.items()))
        table.add_row("allocation recipe", str(result.out / allocation.recipe_file))
    return table


def block_losses(manifest) -> dict[str, tuple[float, float]]:
    """{block: (loss before, loss after)} of the blocks a refinement (SignRound) optimised."""
    losses = {}
    for name, entry in manifest.layers.items():
        if "block_loss_before" in entry.metrics:
            block = re.match(r"(.*?\.\d+)\.", name).group(1)     # model.layers.3.mlp.experts.5.up -> model.layers.3
            losses[block] = (entry.metrics["block_loss_before"], entry.metrics["block_loss_after"])
    return losses


def calibration_json(result) -> dict:
    manifest = result.manifest
    layers = {name: entry.metrics for name, entry in manifest.layers.items()}
    refined = block_losses(manifest)
    worst = min(((m.get("output_sqnr_db"), n) for n, m in layers.items() if m.get("output_sqnr_db") is not None),
                default=(None, None))
    return {
        "out": str(result.out),
        "manifest": str(result.out / "quant_manifest.json"),
        "schemes": sorted({entry.scheme.name for entry in manifest.layers.values()}),
        "algorithms": sorted({entry.algorithm for entry in manifest.layers.values()}),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "overlapped_s": round(result.overlapped_seconds, 3),
        "total_s": round(result.total_seconds, 3),
        "peak_rss_mib": round(result.peak_rss_bytes / 2**20, 1),
        "layers_quantized": len(layers),
        "worst_output_sqnr": {"layer": worst[1], "db": worst[0] if worst[0] != math.inf else None},
        "estimate": manifest.summary.estimate,
        "notes": layer_notes(manifest),
        **({"block_loss": {block: {"before": b, "after": a} for block, (b, a) in refined.items()}} if refined else {}),
        **({"allocation": manifest.allocation.to_dict()} if manifest.allocation else {}),
        **({"final_norm": manifest.summary.final_norm} if manifest.summary.final_norm else {}),
    }


def layer_notes(manifest) -> dict[str, str]:
    """{layer: note} of the layers whose run departed from the plan (MoE experts without tokens)."""
    return {name: entry.note for name, entry in manifest.layers.items() if entry.note}


def notes_line(manifest) -> str | None:
    """One line summarising the layer notes, or None."""
    notes = layer_notes(manifest)
    if not notes:
        return None
    first = next(iter(notes))
    more = f" and {len(notes) - 1} more layers" if len(notes) > 1 else ""
    return f"note: {first}{more}: {notes[first]} (see the manifest's per-layer 'note')"


def eval_table(report) -> Table:
    # Paths go in the caption, one line each: as a column they fold into unreadable slivers at 80 columns.
    paths = "\n".join(f"{row.label}: {row.model}" for row in report.rows)
    table = Table(title="quantkit eval", caption=f"{paths}\nprotocol: {report.protocol.describe()}",
                  caption_justify="left")
    for column in ("model", "perplexity", "vs reference", "KL(ref || model)", "top-1 agreement"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    reference = next((row.perplexity for row in report.rows if row.label == "reference"), None)
    for row in report.rows:
        delta = "" if reference is None or row.label == "reference" else f"{100 * (row.perplexity / reference - 1):+.2f}%"
        table.add_row(row.label, f"{row.perplexity:.3f}", delta,
                      "" if row.kl_divergence is None else f"{row.kl_divergence:.5f}",
                      "" if row.top1_agreement is None else f"{100 * row.top1_agreement:.2f}%")
    return table
