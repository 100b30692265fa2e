"""The README's and docs' result tables are what benchmarks/tables.py makes from benchmarks/results/*.json."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("tables", REPO / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))])
def test_page_tables_match_the_result_files(tables, page):
    text = (REPO / page).read_text()
    assert tables.render(text) == text, f"{page} is out of date: run python benchmarks/tables.py"


def test_the_readme_shows_generated_tables_and_stays_short(tables):
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    names = [m.group("name") for m in tables.MARKER.finditer(text)]
    assert {"quality", "cpu-serving-isa", "gpu"} <= set(names)


def test_a_table_names_its_source_files_and_their_commits(tables):
    rendered = tables.TABLES["cpu-serving-isa"]()
    assert "Source: [serve-cpu-" in rendered and "commit " in rendered


def test_every_result_file_records_where_it_came_from():
    import json

    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        provenance = json.loads(path.read_text()).get("provenance")
        assert provenance, f"{path.name} has no provenance"
        for field in ("commit", "command", "date", "versions"):
            assert field in provenance, f"{path.name}: provenance has no {field}"
        assert "cpu" in provenance or "gpu" in provenance, f"{path.name}: provenance names no device"


@pytest.mark.parametrize("page", ["README.md", "docs/commands.md"])
def test_the_pages_list_the_tested_architectures(page):
    """The architectures a page calls tested are the ones the family tests run (architectures.TESTED_FAMILIES)."""
    import re

    from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES

    line = next(line for line in (REPO / page).read_text().splitlines() if re.search(r"\btested\b", line, re.I)
                and "`gemma2`" in line)
    listed = re.findall(r"`([a-z0-9_]+)`", line.split(";")[0])
    assert listed == list(TESTED_FAMILIES), (page, listed)


def test_models_table_puts_the_example_models_side_by_side(tables, monkeypatch):
    """Same config, one column per example model; a config a model's report lacks is 'not measured'."""
    def report(model, base, rows):
        return {"model": f"{model} (package)", "base_perplexity": base, "provenance": {"commit": "0123456789abcdef"},
                "protocol": {"text": "wikitext-2-raw wiki.test.raw", "ctx": 512, "stride": 256, "windows": 64},
                "results": [{"preset": preset, "ppl_ratio": ratio, "bits_per_weight_quantized_modules": bits}
                            for preset, ratio, bits in rows]}
    reports = {"quality-smollm2.json": report("SmolLM2", 21.5, [("w8", 1.0013, 8.0234), ("w4g128", 1.4925, 4.2188)]),
               "quality-gemma3-270m.json": report("Gemma", 30.25, [("w4g128", 1.61, 4.125)])}
    monkeypatch.setattr(tables, "load", reports.__getitem__)
    text = tables.quality_models_table()
    assert "Base perplexity: SmolLM2 21.50, Gemma 30.25." in text
    assert "| config | SmolLM2 | Gemma |" in text
    assert "| int8 per channel, RTN | 1.001 (8.02) | not measured |" in text
    assert "| int4 g128, RTN | 1.492 (4.22) | 1.610 (4.12) |" in text
    assert "| 3-bit codebook g128, GPTQ + block tuning | not measured | not measured |" in text
    assert "[quality-gemma3-270m.json](/benchmarks/results/quality-gemma3-270m.json) (commit 0123456789)" in text
