"""Writers of other checkpoint formats (compressed-tensors; GGUF later)."""
