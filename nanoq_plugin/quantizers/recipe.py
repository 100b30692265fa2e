"""Recipes (presets or YAML files) and their resolution to a plan: one scheme per quantizable module.

YAML recipe file:

    method: rtn                    # a registered method (quantizers.methods): rtn; gptq, awq or awq-gptq need --calib
    default: int4g128              # scheme of every block linear no rule matches
    group_size_fallback: false     # true: a group size that does not divide K falls back to 64, then 32
    rules:                         # first match wins; regexes are searched in the module name
      - match: 'self_attn\\.(q|k|v)_proj$'
        scheme: float              # kept in its stored dtype
      - 'mlp\\.down_proj': int8    # short form: {regex: scheme}
    embeddings: int8               # the token embedding table (default float); rules do not apply to it
    lm_head: int8                  # an untied LM head (default float); a tied head shares the embedding's

Rules and `default` apply to the decoder blocks' linears. When the model ties its LM head to the embedding
and the embedding is quantized, the head computes its logits with the quantized table (one copy).

Presets group-size fall back; a file pins its group sizes unless it says `group_size_fallback: true`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import NanoqError
from ..format.schemes import (ALLOWED_GROUP_SIZES, FLOAT, INT8_CHANNEL, INT8_DYNAMIC_A8, NVFP4, Scheme,
                               parse_scheme)
from .methods import get_method, method_names

if TYPE_CHECKING:  # the recipe module stays free of torch: `nanoq --help` lists its presets
    from .architectures import Architecture


@dataclass(frozen=True)
class Rule:
    """`pattern` is searched in a module name; on a match the module gets `scheme`."""

    pattern: str
    scheme: Scheme

    def matches(self, module: str) -> bool:
        return re.search(self.pattern, module) is not None


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe."""

    name: str
    default: Scheme
    rules: tuple[Rule, ...] = ()
    group_size_fallback: bool = False
    method: str = "rtn"
    embeddings: Scheme = FLOAT
    lm_head: Scheme = FLOAT
    nvfp4_alpha: float = 1.0  # NVFP4 block-scale inflation (quantizers.nvfp4)

    def with_method(self, method: str) -> "Recipe":
        """The same recipe quantized by another registered method (quantizers.methods)."""
        return replace(self, method=get_method(method).name)

    def requested_scheme(self, module: str) -> Scheme:
        """The scheme the recipe asks for `module` (before any group-size fallback)."""
        for rule in self.rules:
            if rule.matches(module):
                return rule.scheme
        return self.default

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "default": self.default.name,
            "group_size_fallback": self.group_size_fallback,
            "rules": [{"match": r.pattern, "scheme": r.scheme.name} for r in self.rules],
            "embeddings": self.embeddings.name,
            "lm_head": self.lm_head.name,
            "nvfp4_alpha": self.nvfp4_alpha,
        }


PRESETS: dict[str, Recipe] = {
    "w8": Recipe("w8", INT8_CHANNEL),
    "w8a8": Recipe("w8a8", INT8_DYNAMIC_A8),  # int8 activations per token at run time (format.activations)
    # and the token embedding int8: a tied LM head then computes int8 x int8 over that one table
    "w8a8-embed": Recipe("w8a8-embed", INT8_DYNAMIC_A8, embeddings=INT8_DYNAMIC_A8, lm_head=INT8_DYNAMIC_A8),
    "w8g128": Recipe("w8g128", parse_scheme("int8g128"), group_size_fallback=True),
    "w4g128": Recipe("w4g128", parse_scheme("int4g128"), group_size_fallback=True),
    "w4g128-asym": Recipe("w4g128-asym", parse_scheme("int4g128-asym"), group_size_fallback=True),
    "w3g128": Recipe("w3g128", parse_scheme("int3g128"), group_size_fallback=True),
    "w2g64": Recipe("w2g64", parse_scheme("int2g64"), group_size_fallback=True),
    "cb2g64": Recipe("cb2g64", parse_scheme("cb2g64"), group_size_fallback=True),
    "cb3g128": Recipe("cb3g128", parse_scheme("cb3g128"), group_size_fallback=True),
    "cb4g128": Recipe("cb4g128", parse_scheme("cb4g128"), group_size_fallback=True),
    "nvfp4": Recipe("nvfp4", NVFP4),
    "nvfp4-alpha2": Recipe("nvfp4-alpha2", NVFP4, nvfp4_alpha=2.0),
    "qkv-fp16": Recipe(
        "qkv-fp16", parse_scheme("int4g128"), rules=(Rule(r"self_attn\.(q|k|v)_proj$", FLOAT),),
        group_size_fallback=True, embeddings=INT8_CHANNEL, lm_head=INT8_CHANNEL,
    ),
}


def _scheme_in(text, where: str) -> Scheme:
    try:
        return parse_scheme(text)
    except NanoqError as err:
        raise NanoqError(f"{where}: {err}") from None


def _parse_rule(item, where: str) -> Rule:
    if isinstance(item, dict) and set(item) == {"match", "scheme"}:
        pattern, scheme_text = item["match"], item["scheme"]
    elif isinstance(item, dict) and len(item) == 1:
        (pattern, scheme_text), = item.items()
    else:
        raise NanoqError(f"{where}: a rule is {{match: REGEX, scheme: SCHEME}} or {{REGEX: SCHEME}}, got {item!r}")
    try:
        re.compile(str(pattern))
    except re.error as err:
        raise NanoqError(f"{where}: invalid regex {pattern!r} ({err})") from None
    return Rule(str(pattern), _scheme_in(scheme_text, f"{where} ({pattern!r})"))


def load_recipe(name_or_path: str) -> Recipe:
    """A preset by name, or a YAML recipe file; NanoqError naming the file and rule on any problem."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise NanoqError(
            f"recipe {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise NanoqError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise NanoqError(f"{path}: a recipe is a YAML mapping with 'default' and optional 'rules'")
    allowed = ("method", "default", "group_size_fallback", "rules", "name", "embeddings", "lm_head", "nvfp4_alpha")
    unknown = set(data) - set(allowed)
    if unknown:
        raise NanoqError(f"{path}: unknown recipe keys {sorted(unknown)} (allowed: {', '.join(allowed)})")
    method = str(data.get("method", "rtn")).lower()
    try:
        get_method(method)
    except NanoqError as err:
        raise NanoqError(f"{path}: {err}") from None
    if "default" not in data:
        raise NanoqError(f"{path}: missing 'default' scheme")
    rules_data = data.get("rules") or []
    if not isinstance(rules_data, list):
        raise NanoqError(f"{path}: 'rules' must be a list")
    rules = tuple(_parse_rule(item, f"{path}: rule {i + 1}") for i, item in enumerate(rules_data))
    return Recipe(
        name=str(data.get("name", path.stem)),
        default=_scheme_in(data["default"], f"{path}: default"),
        rules=rules,
        group_size_fallback=bool(data.get("group_size_fallback", False)),
        method=method,
        embeddings=_scheme_in(data.get("embeddings", "float"), f"{path}: embeddings"),
        lm_head=_scheme_in(data.get("lm_head", "float"), f"{path}: lm_head"),
        nvfp4_alpha=_positive_float(data.get("nvfp4_alpha", 1.0), f"{path}: nvfp4_alpha"),
    )


def _positive_float(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise NanoqError(f"{where}: expected a positive number, got {value!r}")
    return number


@dataclass
class PlannedModule:
    """The scheme a module gets, and the one the recipe asked for (they differ after a fallback)."""

    scheme: Scheme
    requested: Scheme


@dataclass
class Plan:
    """Resolved plan: every block linear, the embedding and the LM head with its scheme (float ones included).

    `tied_lm_head` names the quantized embedding the LM head shares (then the head has no entry).
    """

    modules: dict[str, PlannedModule] = field(default_factory=dict)
    tied_lm_head: str | None = None

    def quantized(self) -> dict[str, Scheme]:
        """Module -> scheme for the modules that are stored quantized."""
        return {m: p.scheme for m, p in self.modules.items() if p.scheme.is_quantized}


def fit_group_size(requested: Scheme, fallback: bool, recipe_name: str, module: str, out_features: int,
                   in_features: int) -> Scheme:
    """`requested`, or with `fallback` the same scheme with the largest smaller group size that divides
    `in_features`; NanoqError naming the recipe and module when the shape does not fit."""
    from ..format.layout import check_shape_fits  # imports torch: only when a plan is made
    if requested.group_size not in ALLOWED_GROUP_SIZES or in_features % requested.group_size == 0:
        check_shape_fits(requested, out_features, in_features, f"recipe {recipe_name}: {module}.weight")
        return requested
    if fallback:
        for size in ALLOWED_GROUP_SIZES:
            if size < requested.group_size and in_features % size == 0:
                return requested.with_group_size(size)
    check_shape_fits(requested, out_features, in_features, f"recipe {recipe_name}: {module}.weight")
    return requested


def _fit_group_size(requested: Scheme, recipe: Recipe, module: str, out_features: int, in_features: int) -> Scheme:
    return fit_group_size(requested, recipe.group_size_fallback, recipe.name, module, out_features, in_features)


def resolve_plan(
    recipe: Recipe,
    arch: Architecture,
    shapes: dict[str, tuple[int, int]],
    table_shapes: dict[str, tuple[int, int]] | None = None,
    tie_word_embeddings: bool = False,
) -> Plan:
    """Resolve `recipe` into a Plan: block linears `shapes` (module -> [out, in]) by rules and default; the
    embedding / LM head in `table_shapes` (module -> [vocab, hidden]) by the recipe's `embeddings` / `lm_head`.

    Enforces that modules an engine fuses (q/k/v, gate/up) share one scheme, and in a mixture-of-experts block
    that every expert's projections of one role (gate and up; down) share one scheme (an engine's fused-MoE
    layer holds one tensor per role for all experts). Routing gates (the router, a shared-expert gate) are not
    block linears: they stay float, and a rule that would quantize one is refused.
    """
    _check_gates(recipe, arch, shapes)
    plan = Plan()
    for module, (out_features, in_features) in shapes.items():
        requested = recipe.requested_scheme(module)
        plan.modules[module] = PlannedModule(
            _fit_group_size(requested, recipe, module, out_features, in_features), requested
        )
    tables = table_shapes or {}
    if recipe.embeddings.is_quantized and not recipe.embeddings.kind.gathers_rows:
        raise NanoqError(f"recipe {recipe.name}: embeddings: {recipe.embeddings.name} is for linears "
                         "(use int8 or int4g128 for the table)")
    method = get_method(recipe.method)
    refused = [p.scheme for p in plan.modules.values() if p.scheme.is_quantized and not method.quantizes(p.scheme)]
    if refused:
        able = [name for name in method_names() if get_method(name).quantizes(refused[0])]
        raise NanoqError(f"recipe {recipe.name}: {refused[0].name} is quantized by {' or '.join(able)} only "
                         f"(got method {recipe.method})")
    if arch.embedding in tables:
        plan.modules[arch.embedding] = PlannedModule(
            _fit_group_size(recipe.embeddings, recipe, arch.embedding, *tables[arch.embedding]), recipe.embeddings
        )
        if tie_word_embeddings and recipe.embeddings.is_quantized:
            plan.tied_lm_head = arch.embedding
    if arch.lm_head in tables and not tie_word_embeddings:
        plan.modules[arch.lm_head] = PlannedModule(
            _fit_group_size(recipe.lm_head, recipe, arch.lm_head, *tables[arch.lm_head]), recipe.lm_head
        )
    for module in plan.modules:
        for group in arch.fused_groups:
            if not module.endswith("." + group[0]):
                continue
            stem = module[: -len(group[0])]
            schemes = {plan.modules[stem + part].scheme.name for part in group if stem + part in plan.modules}
            if len(schemes) > 1:
                names = ", ".join(stem + part for part in group)
                raise NanoqError(
                    f"recipe {recipe.name}: {names} are fused by serving engines and must share one scheme "
                    f"(got {', '.join(sorted(schemes))})"
                )
    _check_expert_roles(recipe, arch, plan)
    return plan


def _blocks(arch: Architecture, shapes) -> list[int]:
    return sorted({b for b in (arch.block_of(m + ".weight") for m in shapes) if b is not None})


def _check_gates(recipe: Recipe, arch: Architecture, shapes) -> None:
    """Refuse a rule that quantizes a routing gate: engines route in float (vLLM builds the router unquantized)."""
    for index in _blocks(arch, shapes):
        for gate in arch.gate_modules(index):
            requested = recipe.requested_scheme(gate)
            if any(rule.matches(gate) for rule in recipe.rules) and requested.is_quantized:
                raise NanoqError(f"recipe {recipe.name}: a rule quantizes the routing gate {gate} ({requested.name}); "
                                 "routers and shared-expert gates stay float (engines route in float)")


def _check_expert_roles(recipe: Recipe, arch: Architecture, plan: Plan) -> None:
    """One scheme per expert role per MoE block (resolve_plan)."""
    if arch.experts is None:
        return
    for index in _blocks(arch, plan.modules):
        for role, modules in arch.expert_modules(index).items():
            schemes = {}
            for module in modules:
                entry = plan.modules.get(module)
                schemes.setdefault("float" if entry is None else entry.scheme.name, module)
            if len(schemes) > 1:
                (first, a), (second, b) = list(schemes.items())[:2]
                raise NanoqError(f"recipe {recipe.name}: block {index}'s experts must share one scheme per role "
                                 f"({role}: an engine's fused-MoE layer holds all experts in one tensor), but "
                                 f"{a} gets {first} and {b} gets {second}")
