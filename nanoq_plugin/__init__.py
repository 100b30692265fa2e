"""nanoq: LLM weight quantization, the nano checkpoint format, kernels and engine plugins.

Importing the package registers the `nano` quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(DIR)` loads a nano checkpoint: at once when transformers is already
imported, else right after transformers is first imported. Importing transformers costs seconds, and the
command line (`nanoq --help`) and the format layer (`import nanoq_plugin.format`) need none of it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    from .engines.transformers import register

    register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is about to be imported, it takes the spec the other finders
    give and runs `_register_with_transformers` once that module has executed. Then it leaves `sys.meta_path`."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
