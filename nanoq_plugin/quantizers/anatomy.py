"""What a decoder model is made of, read from its own transformers class instead of a table of families.

`discover(config)` builds the model's `AutoModelForCausalLM` class on the meta device (no weights, no memory)
and runs one meta forward with hooks. From that it reads:

- the decoder blocks: the `nn.ModuleList` of `num_hidden_layers` modules (`block_prefix`, e.g. `model.layers`);
- each block's linears, and the groups of linears that read the same input tensor, in the order the block
  uses them (q/k/v; o; gate/up; down — or q/k/v/gate/up for a parallel block): the groups GPTQ and AWQ
  calibrate together and that engines fuse;
- the producer of each group's input where a scale can be folded into it (AWQ): a norm whose output is the
  input (its convention read off the module: `w` or Gemma's `1 + w`), or, in a gated MLP, the linear whose
  output is multiplied into the input unchanged (`up_proj` for `down_proj`);
- the embedding, the LM head, the final norm, and whether the head is tied;
- in a mixture-of-experts block: the experts module (the module holding 3-D parameters `[E, out, in]`, e.g.
  transformers 5's `Qwen3MoeExperts`), its router (the sibling module whose weight is `[E, hidden]`), how many
  experts each token goes to (the router's `top_k`, else the config's `num_experts_per_tok`), the name each
  expert projection is saved under (format.expert_tensors, from transformers' own conversion mapping), and the
  routing gates that stay float unless a rule names them (the router, and a linear beside the experts whose
  output is one number or one per expert, e.g. Qwen2-MoE's `shared_expert_gate`). Shared experts are ordinary
  linears.

Nothing here is specific to a family: a model whose anatomy cannot be read this way is refused with one line
naming what was not found.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from ..errors import NanoqError
from .experts import MoeAnatomy, discover_experts

NORM = "norm"
LINEAR = "linear"
# Config fields that count experts (transformers' MoE configs); more than one means a mixture-of-experts block.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class InputGroup:
    """Linears of a block (names relative to the block) that read one input tensor, and where it comes from.

    `producer` is the module (relative name) a per-input-channel scale can be folded into, None where there is
    none; `producer_kind` is NORM or LINEAR; `norm_offset` is 1.0 for norms that compute `(1 + w) * x̂`
    (Gemma), else 0.0.
    """

    linears: tuple[str, ...]
    producer: str | None = None
    producer_kind: str | None = None
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Anatomy:
    """Where a decoder-only model keeps what the quantizer needs (module docstring)."""

    model_type: str
    block_prefix: str
    groups: tuple[InputGroup, ...]
    embedding: str
    lm_head: str | None
    final_norm: str | None
    tied: bool
    experts: MoeAnatomy | None = None  # a mixture-of-experts block's experts (module docstring)


def transformers_config(config: dict, where: str = "config.json"):
    """transformers' config object for a `config.json` dict; NanoqError when transformers has no such model."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise NanoqError(f"{where}: model_type {model_type!r} is not a model transformers knows")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001  (whatever transformers raises on a config it cannot take is bad input)
        raise NanoqError(f"{where}: transformers refuses this {model_type} config "
                         f"({str(err).splitlines()[0][:160]})") from None


def meta_model(hf_config, where: str = "config.json"):
    """The model's causal-LM class, instantiated on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # noqa: BLE001  (e.g. zero heads, heads that do not divide the hidden size)
        raise NanoqError(f"{where}: transformers has no causal-LM class for model_type "
                         f"{hf_config.model_type!r} ({str(err).splitlines()[0][:160]})") from None


def decoder_blocks(model, num_layers: int, where: str):
    """(qualified name, ModuleList) of the decoder blocks: the one ModuleList of `num_layers` modules."""
    from torch import nn

    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == num_layers and name.count(".") <= 2]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise NanoqError(f"{where}: found {what} lists of num_hidden_layers={num_layers} decoder blocks in "
                         f"{type(model).__name__}: its anatomy cannot be discovered")
    return found[0]


def _norm_offset(norm, hidden_size: int) -> float:
    """1.0 when the norm computes `(1 + w) * x̂` (its output with w = 0 is not 0), else 0.0."""
    import copy

    import torch

    probe = copy.deepcopy(norm).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*probe.parameters(), *probe.buffers()):
            tensor.zero_()
        out = probe(torch.ones(1, hidden_size) + torch.arange(hidden_size) / hidden_size)
    return 1.0 if bool(out.abs().max() > 0) else 0.0


def _trace_block(model, blocks, hf_config):
    """Run one meta forward; per linear of block 0 its input tensor, per module of block 0 its output tensor
    and the tensors each module received (references kept, so object identities stay unique)."""
    import torch
    from torch import nn

    block = blocks[0]
    inputs: dict[str, object] = {}
    outputs: dict[int, str] = {}
    consumed: dict[int, list[str]] = {}
    keep: list = []
    handles = []

    class _Stop(Exception):
        pass

    for name, module in block.named_modules():
        if not name:
            continue

        def pre(module, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                if not list(module.children()):  # leaves only: a container (`mlp`) passes its input on
                    consumed.setdefault(id(args[0]), []).append(name)
                if isinstance(module, nn.Linear):
                    inputs.setdefault(name, args[0])

        def post(module, args, output, name=name):
            if isinstance(output, torch.Tensor):
                keep.append(output)
                outputs.setdefault(id(output), name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def stop(module, args, output):
        raise _Stop

    handles.append(block.register_forward_hook(stop))
    # an experts module (3-D parameters) routes data-dependently (nonzero), which the meta device cannot run: it
    # answers zeros of its input's shape meanwhile (what it reads is still seen by the hooks)
    stubbed = [m for m in block.modules() if any(p.dim() > 2 for p in m.parameters(recurse=False))]
    for module in stubbed:
        module.forward = lambda hidden, *args, **kwargs: torch.zeros_like(hidden)
    ids = torch.zeros((1, 8), dtype=torch.long, device="meta")
    try:
        with _no_packed_sequence_probe():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for module in stubbed:
            del module.forward
    return inputs, outputs, consumed


@contextmanager
def _no_packed_sequence_probe():
    """transformers' mask builder looks at position-id values to detect packed sequences (`.item()`), which a
    meta forward has none of; the trace runs one unpacked sequence, so the probe is answered "none" meanwhile."""
    from transformers import masking_utils

    probe = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = probe


@lru_cache(maxsize=16)
def _discover(config_items: tuple, where: str) -> Anatomy:
    import json

    from torch import nn

    config = json.loads(config_items[0])
    hf_config = transformers_config(config, where)
    hf_config._attn_implementation = "sdpa"
    hf_config._experts_implementation = "eager"  # the experts' own loop (grouped kernels need bf16 and a device)
    model = meta_model(hf_config, where)
    num_layers = hf_config.num_hidden_layers
    block_prefix, blocks = decoder_blocks(model, num_layers, where)
    experts = discover_experts(model, block_prefix, blocks, hf_config, where, EXPERT_KEYS)
    linears = [name for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NanoqError(f"{where}: the decoder blocks of {type(model).__name__} hold no nn.Linear: "
                         "nothing to quantize")
    for index, block in enumerate(blocks):
        names = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        if names != linears:
            raise NanoqError(f"{where}: block {index} of {type(model).__name__} holds other linears than block 0 "
                             f"({sorted(set(names) ^ set(linears))[:3]}): blocks of different anatomy are not "
                             "supported")
    try:
        inputs, outputs, consumed = _trace_block(model, blocks, hf_config)
    except Exception as err:  # noqa: BLE001
        raise NanoqError(f"{where}: {type(model).__name__} does not run on the meta device, so its anatomy "
                         f"cannot be discovered ({str(err).splitlines()[0][:160]})") from None
    unused = [name for name in linears if name not in inputs]
    if unused:
        raise NanoqError(f"{where}: linears {unused[:3]} of {type(model).__name__}'s blocks never run in a forward "
                         "pass: its anatomy cannot be discovered")

    modules = dict(blocks[0].named_modules())
    order: list[list[str]] = []
    by_input: dict[int, list[str]] = {}
    for name in sorted(linears, key=list(inputs).index):
        key = id(inputs[name])
        if key not in by_input:
            by_input[key] = []
            order.append(by_input[key])
        by_input[key].append(name)

    groups = []
    for group in order:
        key = id(inputs[group[0]])
        in_features = modules[group[0]].in_features
        producer = outputs.get(key)
        kind, offset = None, 0.0
        if producer is not None and isinstance(modules[producer], nn.Linear):
            kind = LINEAR
        elif producer is not None and _is_norm(modules[producer], in_features):
            if consumed.get(key, []) == list(group):  # the norm feeds this group only
                kind, offset = NORM, _norm_offset(modules[producer], in_features)
        if kind is None:
            producer = _gated_producer(group, in_features, order, inputs, outputs, consumed, modules)
            kind = LINEAR if producer is not None else None
        groups.append(InputGroup(tuple(group), producer, kind, offset))

    embedding = _qualified(model, model.get_input_embeddings())
    head_module = model.get_output_embeddings()
    lm_head = _qualified(model, head_module) if head_module is not None else None
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    final_norm = _final_norm(model, block_prefix, embedding, hf_config.hidden_size)
    return Anatomy(config.get("model_type"), block_prefix, tuple(groups), embedding, lm_head, final_norm, tied,
                   experts)


def _is_norm(module, width: int) -> bool:
    """A module with a weight of shape [width] and no other matrix: a norm (RMSNorm, LayerNorm, Gemma's)."""
    weight = getattr(module, "weight", None)
    return weight is not None and tuple(weight.shape) == (width,) and not list(module.children())


def _gated_producer(group, in_features, order, inputs, outputs, consumed, modules) -> str | None:
    """In a gated MLP (`act(gate(x)) * up(x)`), the input of `down` is `up`'s output scaled elementwise: a
    scale folds into `up`'s output rows. `up` is the one linear of an earlier group whose output width is this
    group's input width and whose output no module reads (it is multiplied in), beside a linear of the same
    output width whose output goes into a module (the activation)."""
    candidates = []
    for earlier in order:
        if earlier is group:
            break
        activated = {modules[name].out_features for name in earlier if consumed.get(_output_id(outputs, name))}
        for name in earlier:
            if (modules[name].out_features == in_features and in_features in activated
                    and not consumed.get(_output_id(outputs, name))):
                candidates.append(name)
    return candidates[0] if len(candidates) == 1 else None


def _output_id(outputs: dict[int, str], name: str) -> int | None:
    return next((key for key, producer in outputs.items() if producer == name), None)


def _qualified(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _final_norm(model, block_prefix: str, embedding: str, hidden_size: int) -> str | None:
    """The norm of the base model after its blocks: a direct child of the blocks' parent that is a norm."""
    parent = block_prefix.rpartition(".")[0]
    base = model.get_submodule(parent) if parent else model
    norms = [name for name, child in base.named_children() if _is_norm(child, hidden_size)]
    if len(norms) != 1:
        return None
    return f"{parent}.{norms[0]}" if parent else norms[0]


def discover(config: dict, where: str = "config.json") -> Anatomy:
    """The anatomy of the model a `config.json` dict describes (module docstring); NanoqError naming `where`
    and what was not found when it cannot be read."""
    import json

    return _discover((json.dumps(config, sort_keys=True),), where)
