"""Kernels behind one dispatch module (`ops`): torch custom ops with fake implementations."""
