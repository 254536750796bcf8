"""Outputs: the manifest schema, the native packed safetensors (and its loader), GGUF, compressed-tensors."""
