"""Imports point one way: format <- kernels <- quantizers / engines <- eval / surgery <- cli (docs: DESIGN layers)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoq_plugin"
FORBIDDEN = {
    "format": {"kernels", "quantizers", "engines", "eval", "cli", "example_model"},
    "kernels": {"quantizers", "engines", "eval", "cli", "example_model"},
    "quantizers": {"engines", "eval", "cli"},
    "engines": {"quantizers", "eval", "cli"},
    "export": {"engines", "eval", "cli"},
    "surgery": {"engines", "cli"},
}


def imported_subpackages(path: Path) -> set[str]:
    """The package's top-level modules that `path` imports (relative imports resolved from its folder depth)."""
    tree = ast.parse(path.read_text())
    to_top = len(path.relative_to(PACKAGE).parts)  # the relative level that reaches nanoq_plugin itself
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == to_top and node.module:  # from ..pkg import x (from format/), ...pkg (format/kinds/)
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.startswith("nanoq_plugin."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nanoq_plugin."))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))  # subpackages too (format/kinds, quantizers/methods)
    assert files
    for path in files:
        bad = imported_subpackages(path) & FORBIDDEN[layer]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_format_layer_has_no_nn_modules():
    for path in (PACKAGE / "format").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "torch" or all(a.name != "nn" for a in node.names), path
                assert not (node.module or "").startswith("torch.nn"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("torch.nn") for a in node.names), path
            if isinstance(node, ast.Attribute):
                assert not (node.attr == "nn" and getattr(node.value, "id", None) == "torch"), path


def _run(code: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_command_line_parser_imports_neither_torch_nor_transformers():
    """What keeps `nanoq --help` fast: the parser's defaults come from plain-data modules."""
    _run("import sys; from nanoq_plugin.cli import build_parser; build_parser(); "
         "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy")


def test_the_format_layer_imports_without_transformers():
    _run("import sys, nanoq_plugin.format.validate, nanoq_plugin.format.reference; "
         "assert 'transformers' not in sys.modules")


def test_importing_the_package_registers_nano_once_transformers_is_imported():
    _run("import sys, nanoq_plugin; assert 'transformers' not in sys.modules; "
         "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING; "
         "assert 'nano' in AUTO_QUANTIZER_MAPPING and 'nano' in AUTO_QUANTIZATION_CONFIG_MAPPING")
    _run("import transformers, nanoq_plugin; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
         "assert 'nano' in AUTO_QUANTIZER_MAPPING")
