"""quantkit: offline LLM calibration and quantization."""
from __future__ import annotations

__version__ = "0.1.0"


def load_quantized(path, *, dtype=None, device="cpu"):
    """Rebuild a runnable torch model from a quantkit output directory (manifest + safetensors)."""
    from quantkit.native.loader import load_quantized as _load_quantized

    return _load_quantized(path, dtype=dtype, device=device)


__all__ = ["__version__", "load_quantized"]
