"""The generated model card (`README.md`) of a nano checkpoint, from its manifest and eval summary."""

from __future__ import annotations

from collections import Counter


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _calibration_lines(provenance: dict) -> list[str]:
    """Calibration data, block tuning and end-to-end tuning, where the checkpoint used them."""
    lines = []
    calibration = provenance.get("calibration") or {}
    if calibration.get("used"):
        text = "text sampled from the model" if calibration.get("self_generated") else f"`{calibration.get('file')}`"
        lines.append(f"- Calibration: {text}, {calibration.get('windows')} windows of {calibration.get('seq_len')} tokens")
    tuning = calibration.get("tuning")
    if tuning:
        kept = sum(1 for block in tuning["blocks"] if block["kept"])
        lines.append(f"- Block tuning: {tuning['steps']} steps per block, kept in {kept} of {len(tuning['blocks'])} blocks")
    e2e = provenance.get("e2e_tuning")
    if e2e:
        verdict = "kept" if e2e["kept"] else "not kept"
        lines.append(f"- End-to-end tuning: {e2e['steps']} steps on {e2e['windows']} windows; KL to the float model on "
                     f"{e2e['held_out_windows']} held-out windows {e2e['held_out_kl_before']} -> "
                     f"{e2e['held_out_kl_after']} ({verdict})")
    return lines


def _scoring_line(scoring: dict | None) -> str | None:
    """How the checkpoint was run for its perplexity (eval.quantized_model), where the summary says."""
    if not scoring or scoring.get("mode") not in ("dequantized", "kernels"):
        return None
    kernels = ", ".join(f"{scheme} ({count})" for scheme, count in scoring.get("kernel_modules", {}).items())
    if scoring["mode"] == "kernels":
        return f"Scored through the checkpoint's kernels: {kernels}."
    line = f"Scored with the weights of {scoring['dequantized_modules']} modules dequantized once (the reference)"
    return line + (f"; through their kernels: {kernels}." if kernels else ".")


def render_model_card(manifest: dict, summary: dict) -> str:
    """Markdown text of the model card."""
    totals = manifest["totals"]
    provenance = manifest.get("provenance", {})
    recipe = provenance.get("recipe", {})
    lines = [
        f"# {provenance.get('source_model', 'model')} — nano {recipe.get('name', '')}".rstrip(),
        "",
        "Quantized with nanoq (format `nano` v1, see docs/FORMAT.md in the nanoq repository). Load it with "
        "`import nanoq_plugin` then `AutoModelForCausalLM.from_pretrained(DIR)`.",
        "",
        "## What is stored, and how",
        "",
        f"- Recipe: `{recipe.get('name')}` (method `{recipe.get('method')}`, default `{recipe.get('default')}`, "
        f"group-size fallback {'on' if recipe.get('group_size_fallback') else 'off'})",
        f"- Source: `{provenance.get('source')}`",
        *_calibration_lines(provenance),
        "",
        "| scheme | modules | params |",
        "|---|---:|---:|",
    ]
    counts, params = Counter(), Counter()
    for record in manifest["modules"].values():
        counts[record["scheme"]] += 1
        params[record["scheme"]] += record["shape"][0] * record["shape"][1]
    for scheme in sorted(counts):
        lines.append(f"| {scheme} | {counts[scheme]} | {params[scheme]:,} |")
    float_params = sum(1 for _ in manifest.get("float_tensors", {}))
    lines.append(f"| float (kept) | {float_params} tensors | {totals['params'] - totals['quantized_params']:,} |")
    lines += [
        "",
        "## Storage",
        "",
        f"- Original: {_mib(totals['original_bytes'])}; stored: {_mib(totals['stored_bytes'])} "
        f"(ratio {totals['ratio']}×)",
        f"- Bits per weight: {totals['bits_per_weight']} over all tensors, "
        f"{totals['quantized_bits_per_weight']} over the quantized modules",
        "",
        "## Evaluation",
        "",
    ]
    ppl = summary.get("perplexity")
    if ppl:
        protocol = summary["protocol"]
        lines.append(
            f"Perplexity on `{summary.get('text')}` (context {protocol['ctx']}, stride {protocol['stride']}, "
            f"{protocol['windows']} windows, {protocol['scored_tokens']} tokens):"
        )
        lines += ["", "| model | perplexity |", "|---|---:|"]
        if summary.get("base_perplexity") is not None:
            lines.append(f"| base | {summary['base_perplexity']:.3f} |")
        lines.append(f"| this checkpoint | {ppl:.3f} |")
        scoring = _scoring_line(summary.get("scoring"))
        if scoring:
            lines += ["", scoring]
        if summary.get("ppl_ratio") is not None:
            lines += ["", f"Perplexity ratio to base: **{summary['ppl_ratio']:.4f}**; mean last-token logit cosine "
                          f"to base: {summary['logit_cosine']:.5f}."]
        routing = summary.get("routing_agreement")
        if routing and routing.get("overall") is not None:
            worst = min(((v, k) for k, v in routing["blocks"].items() if v is not None), default=None)
            lines += ["", f"Routing agreement with base (tokens whose top-k experts are the same set): "
                          f"**{routing['overall']:.4f}** over {routing['tokens']} tokens per MoE block"
                          + (f"; lowest block `{worst[1]}` {worst[0]:.4f}." if worst else ".")]
    else:
        lines.append("No perplexity text was given.")
    if provenance.get("example_model_note"):
        lines += ["", f"> Note: {provenance['example_model_note']}."]
    samples = summary.get("samples", [])
    if samples:
        lines += ["", "## Greedy samples (32 tokens)", ""]
        for sample in samples:
            lines.append(f"- **{sample['prompt']}**")
            if "base" in sample:
                lines.append(f"  - base: {sample['base']!r}")
            lines.append(f"  - this checkpoint: {sample['quantized']!r}")
    versions = provenance.get("versions", {})
    lines += ["", "## Provenance", "", f"Created {provenance.get('created')} with "
              + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines) + "\n"
