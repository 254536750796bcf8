"""The quant manifest (``quant_manifest.json``): with the safetensors it alone suffices to load the model.

Versioned (`FORMAT_VERSION`); `Manifest.to_dict` / `Manifest.from_dict` round-trip exactly, and a
manifest of another format version or with missing fields is refused with a clear error.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.schemes import Scheme, scheme_from_dict, scheme_to_dict

FORMAT_VERSION = 1
MANIFEST_NAME = "quant_manifest.json"


def _finite_or_none(value):
    """JSON has no Infinity: an exact (infinite-SQNR) metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


_REQUIRED_FIELDS = {"tool": dict, "source": dict, "calibration": dict, "storage_dtype": str, "layers": dict}
_OPTIONAL_FIELDS = {"smoothing": dict, "ignored": dict, "recipe": dict, "weight_files": list,
                    "search_results": str, "summary": dict}
_KIND_NAMES = {dict: "an object", str: "a string", list: "an array"}


@dataclass
class LayerEntry:
    """One quantized Linear: what grid it got, from which algorithm and rule, and where its tensors are.

    tensors maps a role (codes, scale, zero, g_idx, input_scale, input_zero, bias) to its tensor name.
    codes_layout: "int8" (one code per byte) or "int32-packed" (see quantkit.algorithms.packing).
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

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scheme"] = scheme_to_dict(self.scheme)
        data["shape"] = list(self.shape)
        data["metrics"] = {k: _finite_or_none(v) for k, v in self.metrics.items()}
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


@dataclass
class Manifest:
    tool: dict                    # {"name": "quantkit", "version": ...}
    source: dict                  # requested, path, hub_id, architecture, dtype, weights_sha256, files
    calibration: dict             # dataset, data_files, num_samples, seq_len, seed, alpha, smooth, ...
    storage_dtype: str            # dtype of every float tensor kept from the source (norms, embeddings)
    layers: dict[str, LayerEntry]
    smoothing: dict = field(default_factory=dict)      # alpha and the smoothed norm/linear names
    ignored: dict[str, str] = field(default_factory=dict)  # block Linears kept in the source dtype, and why
    recipe: dict | None = None                         # the recipe as parsed, when one was used
    weight_files: list[str] = field(default_factory=list)
    search_results: str | None = None                  # file holding AWQ scales, GPTQ g_idx, ...
    summary: dict = field(default_factory=dict)        # timings, peak memory, error extremes
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "tool": self.tool,
            "source": self.source,
            "calibration": self.calibration,
            "storage_dtype": self.storage_dtype,
            "smoothing": self.smoothing,
            "ignored": self.ignored,
            "recipe": self.recipe,
            "weight_files": self.weight_files,
            "search_results": self.search_results,
            "summary": self.summary,
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
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
        return cls(
            tool=data["tool"], source=data["source"], calibration=data["calibration"],
            storage_dtype=data["storage_dtype"], smoothing=data.get("smoothing") or {},
            ignored=dict(data.get("ignored") or {}), recipe=data.get("recipe"),
            weight_files=list(data.get("weight_files") or []), search_results=data.get("search_results"),
            summary=data.get("summary") or {}, format_version=version, layers=layers,
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
