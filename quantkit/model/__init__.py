"""The model side: HF checkpoints, the architecture tables, the QuantLinear module."""
