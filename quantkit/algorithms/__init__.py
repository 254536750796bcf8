"""Quantization primitives, packing, and one module per algorithm (registered by name)."""
