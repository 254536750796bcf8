"""Calibration: datasets into seeded token batches, hooks, and running per-channel statistics."""
