"""quantkit's own output format: packed safetensors plus quant_manifest.json, written and loaded."""
