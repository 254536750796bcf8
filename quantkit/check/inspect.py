"""`quantkit inspect`: per-layer statistics of a float checkpoint or a quantkit output, and a self-contained
HTML report of them (matplotlib figures embedded as PNG; the report's numbers also embedded as JSON).

Sections (each one figure and one table in the HTML):
  weights      per block Linear: absmax and the 50/99/99.9th percentiles of |w|, and its outlier input
               channels: columns whose absmax exceeds `OUTLIER_RATIO` x the median column absmax. A quantkit
               output's weights are its stored (dequantized) ones.
  activations  (quantkit outputs calibrated on data) per Linear: the absmax of each input channel as the
               calibration saw it (search results ``<linear>.in_absmax``, saved after SmoothQuant and AWQ divided
               the input; multiplied back by their saved factors, through the GQA channel map where shared, so
               the block's own input) and the channels above `OUTLIER_RATIO` x their median.
  smoothing    (SmoothQuant outputs) the alpha each block kept (manifest ``smoothing.block_alpha``) and, per
               smoothed group, the channels it divided most: s_j = max|X_j|^a / max|W_j|^(1-a) from the
               saved factors ``<block>.<prev>.smooth_factors``, with the activation absmax before (x s_j)
               and after.
  errors       (quantkit outputs) per Linear: grid, algorithm and the recipe rule that chose it (manifest),
               weight and output SQNR as calibration recorded them, and where the error concentrates:
               output SQNR by block and Linear kind.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.files import json_safe

OUTLIER_RATIO = 8.0          # a channel is an outlier above this multiple of the median channel absmax
MAX_LISTED = 8               # outlier channels listed per layer (largest first)
_SAMPLE = 1 << 24            # percentiles of larger matrices come from an evenly strided sample


@dataclass
class WeightStats:
    """|w| statistics of one Linear (percentiles of |w| over all entries)."""

    name: str
    shape: tuple[int, int]
    absmax: float
    p50: float
    p99: float
    p999: float
    outlier_channels: list[int]          # input channels, largest column absmax first (at most MAX_LISTED)
    outlier_count: int


@dataclass
class ActivationStats:
    name: str
    absmax: float
    median: float
    outlier_channels: list[int]
    outlier_count: int
    before_scaling: bool = False         # times the SmoothQuant/AWQ factors: the block's own input
    channel_absmax: list[float] = field(repr=False, default_factory=list)


@dataclass
class SmoothedGroup:
    block: int
    prev: str
    alpha: float | None
    channels: list[int]                  # the channels divided most (largest s_j first)
    factors: list[float]
    absmax_before: list[float]
    absmax_after: list[float]


@dataclass
class LayerQuality:
    name: str
    grid: str
    algorithm: str
    rule: str
    weight_sqnr_db: float | None
    output_sqnr_db: float | None


@dataclass
class InspectReport:
    path: Path
    kind: str                            # "float checkpoint" | "quantkit output"
    architecture: str
    weights: list[WeightStats]
    activations: list[ActivationStats] = field(default_factory=list)
    block_alpha: dict[str, float | None] = field(default_factory=dict)
    smoothed: list[SmoothedGroup] = field(default_factory=list)
    quality: list[LayerQuality] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        for row in data["activations"]:
            row.pop("channel_absmax")
        return _json_safe(data)

    def worst(self, count: int = 10) -> list[LayerQuality]:
        """The Linears with the lowest output SQNR (weight SQNR where none was recorded)."""
        def key(row: LayerQuality) -> float:
            value = row.output_sqnr_db if row.output_sqnr_db is not None else row.weight_sqnr_db
            return math.inf if value is None else value
        return sorted(self.quality, key=key)[:count]


def _json_safe(value):
    """`files.json_safe` through dicts and lists (inf and NaN as null)."""
    if isinstance(value, float):
        return json_safe(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def weight_stats(name: str, weight: torch.Tensor) -> WeightStats:
    """weight [out, in] any float dtype -> its |w| statistics and outlier input channels."""
    magnitude = weight.detach().float().abs()
    flat = magnitude.reshape(-1)
    sample = flat[:: -(-flat.numel() // _SAMPLE)]       # at most _SAMPLE values (torch.quantile's limit)
    p50, p99, p999 = torch.quantile(sample, torch.tensor([0.5, 0.99, 0.999])).tolist()
    columns = magnitude.amax(dim=0)
    outliers = _outliers(columns)
    return WeightStats(name, tuple(weight.shape), float(flat.max()), p50, p99, p999, outliers[:MAX_LISTED],
                       len(outliers))


def _outliers(channel_absmax: torch.Tensor) -> list[int]:
    """Channels above OUTLIER_RATIO x the median, largest first."""
    threshold = OUTLIER_RATIO * float(channel_absmax.median())
    above = torch.nonzero(channel_absmax > threshold).flatten()
    return above[channel_absmax[above].argsort(descending=True)].tolist()


def activation_stats(name: str, channel_absmax: torch.Tensor, before_scaling: bool = False) -> ActivationStats:
    """channel_absmax [in] float32: max |x_j| of a Linear's input per channel -> its outlier channels."""
    outliers = _outliers(channel_absmax.float())
    return ActivationStats(name, float(channel_absmax.max()), float(channel_absmax.median()), outliers[:MAX_LISTED],
                           len(outliers), before_scaling, channel_absmax.float().tolist())


def inspect_model(path: Path) -> InspectReport:
    """Statistics of a quantkit output directory (manifest present) or a float HF checkpoint."""
    from quantkit.model.architectures import architecture_for
    from quantkit.model.checkpoint import Checkpoint
    from quantkit.native.loader import check_manifest_present
    from quantkit.native.manifest import MANIFEST_NAME

    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"not found: {path} (give a checkpoint directory or a quantkit output)"
                            if not path.exists() else f"{path} is a file; give a checkpoint directory")
    if (path / MANIFEST_NAME).is_file():
        return _inspect_output(path)
    if not (path / "config.json").is_file():
        raise QuantkitError(f"{path} is neither a quantkit output ({MANIFEST_NAME}) nor a checkpoint (config.json)")
    checkpoint = Checkpoint(path)
    check_manifest_present(checkpoint)
    if getattr(checkpoint.config, "quantization_config", None):
        raise QuantkitError(f"{path} is quantized by another tool (config.json has quantization_config); inspect "
                            "reads float checkpoints and quantkit outputs")
    arch = architecture_for(checkpoint.config)
    names = [n for n in arch.block_linears(checkpoint.text_config.num_hidden_layers) if checkpoint.has(n + ".weight")]
    if not names:
        raise QuantkitError(f"{path} holds none of the {arch.name} block Linears' weights")
    weights = [weight_stats(n, checkpoint.tensors([n + ".weight"])[n + ".weight"]) for n in names]
    return InspectReport(path, "float checkpoint", arch.name, weights,
                         notes=["a float checkpoint: activations, smoothing and errors come from a quantkit output"])


def _inspect_output(path: Path) -> InspectReport:
    from quantkit.model.architectures import architecture_for
    from quantkit.native.loader import load_search_results, open_native, read_record
    from quantkit.native.manifest import IN_ABSMAX

    checkpoint, manifest = open_native(path)
    arch = architecture_for(checkpoint.config)
    results = load_search_results(path, manifest)
    weights, quality = [], []
    for name, entry in manifest.layers.items():
        record = read_record(entry, checkpoint.tensors(list(entry.tensors.values())))
        weights.append(weight_stats(name, record.quant.dequantize()))
        quality.append(LayerQuality(name, entry.scheme.weight.describe(), entry.algorithm, entry.rule,
                                    entry.metrics.get("weight_sqnr_db"), entry.metrics.get("output_sqnr_db")))
    unscale = _input_scaling(manifest, arch, checkpoint.text_config, results)
    activations = [activation_stats(name, results[f"{name}.{IN_ABSMAX}"] * unscale.get(name, 1.0),
                                    before_scaling=name in unscale)
                   for name in manifest.layers if f"{name}.{IN_ABSMAX}" in results]
    notes = [] if activations or manifest.calibration.skipped else \
        ["no per-channel activation statistics saved (an output of an older quantkit)"]
    report = InspectReport(path, "quantkit output", arch.name, weights, activations,
                           dict(manifest.smoothing.block_alpha), quality=quality, notes=notes)
    report.smoothed = _smoothed_groups(manifest, arch, results)
    return report


def _input_scaling(manifest, arch, config, results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear -> [in] the factor its input was divided by before quantization: SmoothQuant's s and AWQ's
    scales of the group feeding it (through the GQA channel map where shared), multiplied. The saved
    ``in_absmax`` is of x / factor: times the factor it is the block's own input."""
    from quantkit.algorithms.awq import SCALES
    from quantkit.algorithms.smoothquant import FACTORS, result_name
    from quantkit.model.architectures import channel_map

    factors: dict[str, torch.Tensor] = {}
    blocks = {name.split(".")[len(arch.blocks.split("."))] for name in manifest.layers}
    for block in blocks:
        prefix = f"{arch.blocks}.{block}"
        for groups, kind in ((arch.smooth, FACTORS), (arch.awq, SCALES)):
            for group in groups:
                scales = results.get(result_name(prefix, group.prev, kind))
                for consumer in group.consumers if scales is not None else ():
                    entry = manifest.layers.get(f"{prefix}.{consumer}")
                    if entry is None:
                        continue
                    column_map = channel_map(group, config, entry.shape[1])
                    factor = (scales if column_map is None else scales[column_map]).float()
                    name = f"{prefix}.{consumer}"
                    factors[name] = factors[name] * factor if name in factors else factor
    return factors


def _smoothed_groups(manifest, arch, results: dict[str, torch.Tensor]) -> list[SmoothedGroup]:
    """Per block and smoothed group: the channels SmoothQuant divided most, absmax before and after."""
    from quantkit.algorithms.smoothquant import result_name
    from quantkit.native.manifest import IN_ABSMAX

    groups = []
    for block, alpha in manifest.smoothing.block_alpha.items():
        prefix = f"{arch.blocks}.{block}"
        for group in arch.smooth:
            factors = results.get(result_name(prefix, group.prev))
            after = results.get(f"{prefix}.{group.consumers[0]}.{IN_ABSMAX}")
            if factors is None or after is None or factors.numel() != after.numel():
                continue       # a GQA-shared group's factors map to channels through heads; listed by factor only
            top = factors.argsort(descending=True)[:MAX_LISTED]
            groups.append(SmoothedGroup(int(block), group.prev, alpha, top.tolist(), factors[top].tolist(),
                                        (after[top] * factors[top]).tolist(), after[top].tolist()))
    return groups


# ------------------------------------------------------------------------------------------------ HTML


def write_html(report: InspectReport, out: Path, overwrite: bool = False) -> Path:
    """A self-contained HTML file: one figure (PNG, base64) and one table per section, plus the numbers as
    JSON (``<script id="quantkit-report" type="application/json">``)."""
    from quantkit.files import REPORT_MARKER, staged_file

    check_report_output(out, overwrite, report.path)
    sections = [_weights_section(report)]
    if report.activations:
        sections.append(_activations_section(report))
    if report.block_alpha:
        sections.append(_smoothing_section(report))
    if report.quality:
        sections.append(_errors_section(report))
    body = "\n".join(sections)
    data = json.dumps(report.to_dict()).replace("</", "<\\/")
    notes = "".join(f"<p class=note>{html.escape(note)}</p>" for note in report.notes)
    document = (f"<!DOCTYPE html><html><head>{REPORT_MARKER.decode()}<meta charset=utf-8><title>quantkit inspect: {html.escape(report.path.name)}"
                f"</title><style>{_CSS}</style></head><body><h1>quantkit inspect: {html.escape(str(report.path))}</h1>"
                f"<p>{html.escape(report.kind)}, {html.escape(report.architecture)}, {len(report.weights)} Linears"
                f"</p>{notes}{body}<script id=quantkit-report type=application/json>{data}</script></body></html>\n")
    with staged_file(out, overwrite) as staging:
        staging.write_text(document, encoding="utf-8")
    return out


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
        ".note{color:#a60}img{max-width:100%}")


def check_report_output(out: Path, overwrite: bool, source: Path) -> None:
    """Before any statistics: the report's path may be written and matplotlib is there."""
    from quantkit.files import check_output_path

    if out.is_dir():
        raise QuantkitError(f"output {out} is a directory; give the path of the .html file to write")
    check_output_path(out, overwrite, [source])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QuantkitError("the HTML report needs matplotlib: pip install 'quantkit[report]' "
                            "(or inspect without --out)") from None


def _figure(draw) -> str:
    """draw(figure) on a new matplotlib figure -> an <img> with the PNG inline."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    figure = Figure(figsize=(11, 4), dpi=90, layout="constrained")
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "inf" if value == math.inf else f"{value:.4g}"
        return html.escape("-" if value is None else str(value))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(name: str, title: str, figure: str, table: str) -> str:
    return f'<section id="{name}"><h2>{html.escape(title)}</h2>{figure}{table}</section>'


def _by_kind(names: list[str]) -> dict[str, list[int]]:
    """Row indices per Linear kind (the name after the block index: self_attn.q_proj, mlp.down_proj)."""
    kinds: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        kinds.setdefault(_kind(name), []).append(index)
    return kinds


def _kind(name: str) -> str:
    """The Linear's name inside its block, expert indices as * (mlp.experts.*.down_proj)."""
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    inner = parts[digits[0] + 1:] if digits else parts
    return ".".join("*" if part.isdigit() else part for part in inner)


def _weights_section(report: InspectReport) -> str:
    rows = report.weights

    def draw(figure):
        axes = figure.subplots()
        for kind, indices in _by_kind([r.name for r in rows]).items():
            axes.semilogy(indices, [rows[i].absmax for i in indices], "o", ms=3, label=f"{kind} absmax")
        axes.semilogy(range(len(rows)), [r.p999 for r in rows], "-", color="gray", lw=0.8, label="|w| p99.9")
        axes.set_xlabel("Linear (in block order)")
        axes.set_ylabel("|w|")
        axes.legend(fontsize=7, ncol=4)

    table = _table(["layer", "shape", "absmax", "p50", "p99", "p99.9", "outlier channels", "largest"],
                   [[r.name, "x".join(map(str, r.shape)), r.absmax, r.p50, r.p99, r.p999, r.outlier_count,
                     ", ".join(map(str, r.outlier_channels))] for r in rows])
    return _section("weights", f"Weights: |w| per Linear (outlier channels: column absmax > {OUTLIER_RATIO:g}x the "
                    "median)", _figure(draw), table)


def _activations_section(report: InspectReport) -> str:
    rows = report.activations

    def draw(figure):
        axes = figure.subplots()
        widths = Counter(len(r.channel_absmax) for r in rows)
        width = widths.most_common(1)[0][0]          # the residual stream's width: most Linears read it
        shown = [r for r in rows if len(r.channel_absmax) == width]
        image = torch.tensor([r.channel_absmax for r in shown]).clamp_min(1e-6).log10()
        mesh = axes.imshow(image.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        axes.set_xlabel("input channel")
        axes.set_ylabel(f"Linear ({len(shown)} reading width {width}, in order)")
        figure.colorbar(mesh, ax=axes, label="log10 max |x|")

    table = _table(["layer", "input absmax", "median channel", "outlier channels", "largest", "before scaling"],
                   [[r.name, r.absmax, r.median, r.outlier_count, ", ".join(map(str, r.outlier_channels)),
                     "yes" if r.before_scaling else "-"] for r in rows])
    return _section("activations", "Activations: max |x| per input channel (calibration; before SmoothQuant/AWQ scaling where marked)", _figure(draw), table)


def _smoothing_section(report: InspectReport) -> str:
    blocks = sorted(report.block_alpha, key=int)

    def draw(figure):
        axes = figure.subplots()
        values = [report.block_alpha[b] if report.block_alpha[b] is not None else 0.0 for b in blocks]
        axes.bar([int(b) for b in blocks], values, color=["C0" if report.block_alpha[b] is not None else "C3"
                                                          for b in blocks])
        axes.set_xlabel("block (red: smoothing lost the search, not applied)")
        axes.set_ylabel("alpha")

    table = _table(["block", "alpha", "group (op in front)", "channels divided most", "factor s",
                    "absmax before", "absmax after"],
                   [[g.block, g.alpha, g.prev, ", ".join(map(str, g.channels)), max(g.factors),
                     max(g.absmax_before), max(g.absmax_after)] for g in report.smoothed])
    return _section("smoothing", "SmoothQuant: the alpha each block kept, the channels it moved", _figure(draw), table)


def _errors_section(report: InspectReport) -> str:
    rows = report.quality

    def draw(figure):
        kinds = _by_kind([r.name for r in rows])
        axes = figure.subplots()
        for kind, indices in kinds.items():
            values = [rows[i].output_sqnr_db if rows[i].output_sqnr_db is not None else rows[i].weight_sqnr_db
                      for i in indices]
            axes.plot(range(len(indices)), [math.nan if v is None else v for v in values], "o-", ms=3, label=kind)
        axes.set_xlabel("Linear of that kind, in block order")
        axes.set_ylabel("output SQNR dB (weight SQNR where none)")
        axes.legend(fontsize=7, ncol=4)

    table = _table(["layer", "grid", "algorithm", "rule", "weight SQNR dB", "output SQNR dB"],
                   [[r.name, r.grid, r.algorithm, r.rule, r.weight_sqnr_db, r.output_sqnr_db] for r in rows])
    return _section("errors", "Quantization error per Linear (lowest output SQNR is where the error concentrates)",
                    _figure(draw), table)
