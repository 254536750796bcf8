"""Checking a quantized model: perplexity/KL evaluation, kernel validation."""
