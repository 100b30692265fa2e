"""Kernel tests run Triton in its CPU interpreter: the variable must be set before Triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
