"""Format v1: schemes, bit packing, the PyTorch reference (the executable spec), checkpoint I/O and the manifest.

This layer imports torch and safetensors only: no torch.nn, no kernels, no engines.
"""
