"""Thin adapters from serving engines and libraries to `format` and `kernels.ops`."""
