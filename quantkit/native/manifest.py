"""The quant manifest (``quant_manifest.json``): with the safetensors it alone suffices to load the model.

Versioned (`FORMAT_VERSION`); every section is a dataclass (`ToolInfo`, `SourceInfo`,
`CalibrationInfo`, `SmoothingInfo`, `Summary`, `LayerEntry` per layer), and `Manifest.to_dict` /
`Manifest.from_dict` round-trip exactly; a manifest of another format version or of the wrong shape
is refused with a clear error.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.files import json_safe
from quantkit.formats.schemes import Scheme, scheme_from_dict, scheme_to_dict

FORMAT_VERSION = 1
MANIFEST_NAME = "quant_manifest.json"


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


_REQUIRED_FIELDS = {"tool": dict, "source": dict, "calibration": dict, "storage_dtype": str, "layers": dict}
# The names calibrate saves each quantized Linear's input statistics under in the search results file:
# <linear>.in_sum2 [in] float32 sum of x_j^2, <linear>.in_count [1] float32 tokens (llama.cpp's imatrix).
IN_SUM2, IN_COUNT = "in_sum2", "in_count"
# and <linear>.in_absmax [in] float32 max |x_j| of the input it was quantized on (`quantkit inspect`).
IN_ABSMAX = "in_absmax"
_OPTIONAL_FIELDS = {"smoothing": dict, "ignored": dict, "recipe": dict, "weight_files": list,
                    "search_results": str, "summary": dict, "gguf_file_type": str, "allocation": dict}
_KIND_NAMES = {dict: "an object", str: "a string", list: "an array"}


@dataclass
class LayerEntry:
    """One quantized Linear: what grid it got, from which algorithm and rule, and where its tensors are.

    tensors maps a role (codes, scale, zero, g_idx, input_scale, input_zero, bias) to its tensor name.
    codes_layout: "int8" (one code per byte), "int32-packed" (see quantkit.formats.packing), "fp8_e4m3"
    (float8_e4m3fn values) or "fp4_e2m1-packed" (two 4-bit patterns per uint8, `packing.pack_fp4`).
    """

    scheme: Scheme
    algorithm: str
    rule: str
    shape: tuple[int, int]
    tensors: dict[str, str]
    codes_layout: str
    ragged_last_group: bool = False
    integer_zero: bool = True
    metrics: dict[str, float | None] = field(default_factory=dict)
    note: str = ""          # what happened beyond the plan (a MoE expert without calibration tokens)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scheme"] = scheme_to_dict(self.scheme)
        data["shape"] = list(self.shape)
        data["metrics"] = {k: json_safe(v) for k, v in self.metrics.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerEntry":
        if not isinstance(data, dict):
            raise TypeError(f"the entry is a JSON {_json_type(data)}, not an object")
        data = dict(data)
        data["scheme"] = scheme_from_dict(data["scheme"])
        data["shape"] = tuple(int(size) for size in data["shape"])
        if len(data["shape"]) != 2 or not isinstance(data.get("tensors"), dict) or "codes" not in data["tensors"]:
            raise ValueError("shape must be [out, in] and tensors must name the codes")
        return cls(**data)


def _section(cls, data, where: str, name: str):
    """``cls`` from a JSON object: known fields taken, missing ones defaulted (older writers), a value
    of the wrong shape a `QuantkitError`."""
    if not isinstance(data, dict):
        raise QuantkitError(f"{where}: '{name}' is a JSON {_json_type(data)}, expected an object")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ToolInfo:
    """Who wrote the output."""

    name: str = "quantkit"
    version: str = ""
    created: str = ""                      # ISO 8601, UTC

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SourceInfo:
    """The checkpoint that was quantized: what the user asked for, where it was, and its weights' digest."""

    requested: str | None = None
    path: str | None = None
    hub_id: str | None = None
    architecture: str | None = None
    dtype: str | None = None
    files: list[str] = field(default_factory=list)
    weights_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationInfo:
    """The calibration data and settings; ``skipped`` (and no dataset) when no layer needed data."""

    dataset: dict | None = None            # DatasetSpec.describe(): name, data_files, text_column
    num_samples: int | None = None
    seq_len: int | None = None
    tokens: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    compute_dtype: str | None = None
    metric_samples: int | None = None
    processes: int | None = None
    skipped: str | None = None
    imatrix_from: str | None = None        # "float": the importance statistics are the float model's
    propagate: str | None = None           # "float": each block was calibrated on the float model's inputs

    def to_dict(self) -> dict:
        if self.skipped is not None:
            return {"dataset": self.dataset, "skipped": self.skipped}
        return {k: v for k, v in asdict(self).items()
                if k != "skipped" and (k not in ("imatrix_from", "propagate") or v is not None)}


@dataclass
class SmoothingInfo:
    """SmoothQuant as applied: alpha ("auto": searched per block over alpha_grid), the alpha each
    block kept (None: smoothing lost the search) and the groups smoothed."""

    enabled: bool = False
    alpha: float | str | None = None
    alpha_grid: list[float] | None = None
    block_alpha: dict[str, float | None] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self) if self.enabled else {"enabled": False}


@dataclass
class Summary:
    """Timings, peak memory, error extremes, the estimate made before work and, once `quantkit
    validate` ran, its summary."""

    timings_s: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    layers_quantized: int | None = None
    min_output_sqnr_db: float | None = None
    min_weight_sqnr_db: float | None = None
    estimate: dict | None = None
    validation: dict | None = None
    final_norm: dict | None = None      # the final norm's fit (`run.final_norm.FinalNormFit.to_dict`), if one ran

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("validation", "final_norm"):
            if data[optional] is None:
                del data[optional]
        return data


@dataclass
class AchievedSize:
    """What the written files hold: stored bits per weight of the quantized Linears (codes, scales, zeros,
    second-level scales), those tensors' bytes, and the weight files' bytes."""

    bits: float
    grid_bytes: int
    weight_file_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AllocationInfo:
    """--target-bits/--target-size (`quantkit.run.allocate`): the target, the budget the solver met, the grids
    it chose (label -> Linears), the size the files achieved, and the recipe file it wrote."""

    target: dict[str, float]               # {"bits": B} or {"size_bytes": N, "fixed_bytes_bound": F}
    sensitivity: str                       # "block" | "layer"
    budget_bytes: int
    planned_bytes: int
    planned_bits: float
    candidates: list[str]
    chosen: dict[str, int]
    seconds: float
    recipe_file: str
    achieved: AchievedSize

    def to_dict(self) -> dict:
        return asdict(self)          # achieved included (asdict recurses)

    @classmethod
    def from_dict(cls, data: dict) -> "AllocationInfo":
        return cls(**{**data, "achieved": AchievedSize(**data["achieved"])})


@dataclass
class Manifest:
    tool: ToolInfo
    source: SourceInfo
    calibration: CalibrationInfo
    storage_dtype: str            # dtype of every float tensor kept from the source (norms, embeddings)
    layers: dict[str, LayerEntry]
    smoothing: SmoothingInfo = field(default_factory=SmoothingInfo)
    ignored: dict[str, str] = field(default_factory=dict)  # block Linears kept in the source dtype, and why
    recipe: dict | None = None                         # the recipe as parsed, when one was used
    weight_files: list[str] = field(default_factory=list)
    search_results: str | None = None                  # file holding smoothing factors, AWQ scales, ...
    summary: Summary = field(default_factory=Summary)
    format_version: int = FORMAT_VERSION
    gguf_file_type: str | None = None                  # the llama.cpp file type the plan follows (Q4_K_M, ...)
    allocation: AllocationInfo | None = None           # --target-bits/--target-size: the budget and the choice

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "tool": self.tool.to_dict(),
            "source": self.source.to_dict(),
            "calibration": self.calibration.to_dict(),
            "storage_dtype": self.storage_dtype,
            "smoothing": self.smoothing.to_dict(),
            "ignored": self.ignored,
            "recipe": self.recipe,
            "weight_files": self.weight_files,
            "search_results": self.search_results,
            "summary": self.summary.to_dict(),
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
            **({"gguf_file_type": self.gguf_file_type} if self.gguf_file_type else {}),
            **({"allocation": self.allocation.to_dict()} if self.allocation else {}),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "quant manifest") -> "Manifest":
        """The manifest of a parsed JSON document; any other shape is a `QuantkitError` naming ``where``
        and what is wrong (never a bare AttributeError from a list or a null)."""
        if not isinstance(data, dict):
            raise QuantkitError(f"{where} is a JSON {_json_type(data)}, not an object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise QuantkitError(f"{where}: format_version {version} is not supported (this quantkit reads {FORMAT_VERSION})")
        for key, kind in _REQUIRED_FIELDS.items():
            if key not in data:
                raise QuantkitError(f"{where} has no '{key}' field")
            if not isinstance(data[key], kind):
                raise QuantkitError(f"{where}: '{key}' is a JSON {_json_type(data[key])}, expected {_KIND_NAMES[kind]}")
        for key, kind in _OPTIONAL_FIELDS.items():
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise QuantkitError(f"{where}: '{key}' is a JSON {_json_type(data[key])}, expected {_KIND_NAMES[kind]}")
        layers = {}
        for name, entry in data["layers"].items():
            try:
                layers[name] = LayerEntry.from_dict(entry)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise QuantkitError(f"{where}: layer {name} has a missing or malformed field "
                                    f"({type(error).__name__}: {error})") from None
        try:
            allocation = AllocationInfo.from_dict(data["allocation"]) if data.get("allocation") else None
        except (KeyError, TypeError) as error:
            raise QuantkitError(f"{where}: 'allocation' has a missing or malformed field ({error})") from None
        try:
            sections = dict(
                tool=_section(ToolInfo, data["tool"], where, "tool"),
                source=_section(SourceInfo, data["source"], where, "source"),
                calibration=_section(CalibrationInfo, data["calibration"], where, "calibration"),
                smoothing=_section(SmoothingInfo, data.get("smoothing") or {}, where, "smoothing"),
                summary=_section(Summary, data.get("summary") or {}, where, "summary"),
            )
        except TypeError as error:
            raise QuantkitError(f"{where}: a section has a malformed field ({error})") from None
        return cls(
            storage_dtype=data["storage_dtype"], ignored=dict(data.get("ignored") or {}), recipe=data.get("recipe"),
            weight_files=list(data.get("weight_files") or []), search_results=data.get("search_results"),
            format_version=version, layers=layers, gguf_file_type=data.get("gguf_file_type"),
            allocation=allocation, **sections,
        )

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise QuantkitError(f"{directory} has no {MANIFEST_NAME}; is it a quantkit output directory?")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise QuantkitError(f"corrupt manifest {path}: {error}") from None
        return cls.from_dict(data, where=str(path))
