"""quantkit: offline LLM calibration and quantization.

The public API (`quantkit.api`) mirrors the CLI one to one:
``calibrate``, ``export``, ``evaluate``, ``validate``, ``inspect``; ``load_quantized`` runs an output.
"""
from __future__ import annotations

# The calibration stage's package (quantkit/calibrate/, a docstring only) is imported first: Python binds a
# package onto its parent when it is first imported, so importing it later (from quantkit.calibrate.hooks
# import ...) would replace the function ``quantkit.calibrate`` below with the package.
import quantkit.calibrate  # noqa: F401, I001
from quantkit.api import ProgressEvent, calibrate, evaluate, export, inspect, validate
from quantkit.errors import QuantkitError

__version__ = "0.1.0"


def load_quantized(path, *, dtype=None, device="cpu"):
    """Rebuild a runnable torch model from a quantkit output directory (manifest + safetensors)."""
    from quantkit.native.loader import load_quantized as _load_quantized

    return _load_quantized(path, dtype=dtype, device=device)


__all__ = ["__version__", "ProgressEvent", "QuantkitError", "calibrate", "evaluate", "export", "inspect",
           "load_quantized", "validate"]
