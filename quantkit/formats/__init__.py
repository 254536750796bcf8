"""Number formats and what they mean: schemes, the QuantTensor hand-off, quantization primitives, packing."""
