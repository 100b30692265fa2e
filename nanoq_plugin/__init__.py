"""nanoq: LLM weight quantization, the nano checkpoint format, kernels and engine plugins.

Importing the package registers the `nano` quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(DIR)` loads a nano checkpoint.
"""

__version__ = "0.1.0"

from .engines.transformers import register as _register_transformers  # noqa: E402

_register_transformers()
