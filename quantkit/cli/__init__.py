"""The click CLI: parses flags into config dataclasses, calls one library function, renders with rich."""
