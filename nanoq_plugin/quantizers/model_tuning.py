"""End-to-end tuning of a finished nano checkpoint: with every code fixed, fit all group scales, codebook
levels and RMSNorm weights of the model at once so that its next-token distributions match the float
model's (`nanoq tune`, `nanoq quantize --e2e-steps`).

Block tuning (quantizers.block_tuning) fits each block to the float block's outputs, one block at a time;
what it cannot see is how an error left in block 3 is amplified by block 20 and what the loss makes of it.
This stage trains the whole quantized model against the loss itself: the KL divergence from the float
model's next-token distribution to the quantized model's, on calibration windows (EfficientQAT's E2E-QP,
which trains the step sizes end to end; distilling from the float model instead of plain next-token labels
lets a few dozen windows fit ~1% of the parameters without learning the text). Only continuous stored
values move, so the checkpoint keeps its format, size and kernels.

Memory: the float model is walked one block at a time, once, to get its last hidden states `[W, L, H]`
float32. The quantized model is then held whole as codes (1 byte a weight for codebooks, 2 for integer
schemes) plus its float tensors; with `recompute` (the default) each block's float32 weights and
activations exist only while that block runs, forward and again backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

from ..errors import NanoqError
from ..format.checkpoint import SIDE_FILES, CheckpointWriter, SourceCheckpoint
from ..format.manifest import MANIFEST_NAME
from ..format.reference import dequantize
from ..format.validate import NanoCheckpoint, load_nano_checkpoint
from .architectures import Architecture, open_float_source
from .block_runner import BlockRunner, resolve_device
from .block_tuning import TUNABLE_KINDS, TunableLinear, cosine_schedule, norm_weights
from .calibration import SELF, calibration_windows
from .gptq import flush_denormals
from .methods import get_method, method_names
from .settings import ModelTuneSettings


def next_token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of logits `[..., V]` (any float dtype); a float32 scalar."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _checkpoint_weight(checkpoint: NanoCheckpoint, module: str) -> torch.Tensor:
    """`module`'s weight `[N, K]` float32 as the checkpoint stores it (dequantized when quantized)."""
    scheme = checkpoint.quant_config.modules.get(module)
    if scheme is None:
        return checkpoint.tensors.get(f"{module}.weight").to(torch.float32)
    return dequantize(checkpoint.module_tensors(module), scheme, *checkpoint.module_shape(module))


class QuantizedModel:
    """The quantized model of a nano checkpoint as a differentiable function of its tunable values.

    Block linears of a tunable scheme (quantizers.block_tuning.TUNABLE_KINDS) are `TunableLinear`s; every
    RMSNorm weight (the blocks' and the final one) gets a relative delta; everything else (embedding, head,
    NVFP4 and float linears) is fixed at what the checkpoint stores.
    """

    def __init__(self, checkpoint: NanoCheckpoint, arch: Architecture, runner: BlockRunner, num_layers: int,
                 recompute: bool = False) -> None:
        self.checkpoint, self.arch, self.runner, self.recompute = checkpoint, arch, runner, recompute
        device = runner.device
        self.embedding = _checkpoint_weight(checkpoint, arch.embedding).to(device)  # [V, H]
        if checkpoint.quant_config.tied_lm_head is not None or (
                f"{arch.lm_head}.weight" not in checkpoint.tensors and arch.lm_head not in checkpoint.quant_config.modules):
            self.head = self.embedding
        else:
            self.head = _checkpoint_weight(checkpoint, arch.lm_head).to(device)  # [V, H]
        self.norm = runner.final_norm(checkpoint.tensors.get(f"{arch.final_norm}.weight"))
        self.blocks: list[nn.Module] = []
        self.linears: list[dict[str, TunableLinear]] = []  # per block: name inside the block -> tunable
        names = checkpoint.tensors.keys()
        for index in range(num_layers):
            prefix = f"{arch.block_prefix}.{index}"
            tensors = {name: checkpoint.tensors.get(name).to(torch.float32) for name in names
                       if arch.block_of(name) == index and name.rsplit(".", 1)[0] not in checkpoint.quant_config.modules}
            tunables = {}
            for module in arch.linears_of_block(index):
                scheme = checkpoint.quant_config.modules.get(module)
                if scheme is None:
                    continue
                shape = checkpoint.module_shape(module)
                stored = checkpoint.module_tensors(module)
                if scheme.kind in TUNABLE_KINDS:
                    tunables[module.removeprefix(f"{prefix}.")] = TunableLinear(stored, scheme, *shape, device)
                    tensors[f"{module}.weight"] = torch.zeros(shape)
                else:
                    tensors[f"{module}.weight"] = dequantize(stored, scheme, *shape)
            block = runner.build(index, tensors, arch.block_prefix)
            for parameter in block.parameters():
                parameter.requires_grad_(False)
            for name in tunables:  # the tuned weight replaces it in every call
                block.get_submodule(name).weight.data = torch.empty(0, device=device)
            self.blocks.append(block)
            self.linears.append(tunables)
        self.norms = [{name: weight.detach().clone() for name, weight in norm_weights(block).items()}
                      for block in self.blocks]
        self.norm_deltas = [{name: torch.zeros_like(w, requires_grad=True) for name, w in norms.items()}
                            for norms in self.norms]
        self.final_norm_weight = self.norm.weight.detach().clone()
        self.final_norm_delta = torch.zeros_like(self.final_norm_weight, requires_grad=True)
        for parameter in self.norm.parameters():
            parameter.requires_grad_(False)

    def deltas(self) -> list[torch.Tensor]:
        """Every trainable tensor (relative changes, zero at the checkpoint's values)."""
        found = [d for tunables in self.linears for t in tunables.values() for d in t.deltas]
        found += [d for deltas in self.norm_deltas for d in deltas.values()]
        return found + [self.final_norm_delta]

    def block_output(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` on `hidden [b, L, H]` float32 with its tuned weights and norms."""
        overrides = {f"{name}.weight": t.weight() for name, t in self.linears[index].items()}
        overrides.update({name: self.norms[index][name] * (1 + delta) for name, delta in self.norm_deltas[index].items()})
        return self.runner.call(self.blocks[index], hidden, overrides)

    def final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids [b, L]` int64 -> the last block's output `[b, L, H]` float32 (differentiable in the deltas).

        With `recompute`, each block keeps only its input for the backward pass and rebuilds its weights and
        activations there (one more forward pass; memory: the stored codes plus one block's temporaries)."""
        hidden = self.runner.embed(ids, self.embedding)
        for index in range(len(self.blocks)):
            if self.recompute and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(self.block_output, index, hidden, use_reentrant=False)
            else:
                hidden = self.block_output(index, hidden)
        return hidden

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids [b, L]` int64 -> next-token logits `[b, L, V]` float32."""
        weight = self.final_norm_weight * (1 + self.final_norm_delta)
        normed = torch.func.functional_call(self.norm, {"weight": weight}, (self.final_hidden(ids),))
        return normed @ self.head.t()

    @torch.no_grad()
    def tuned_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> its tuned value (scales, codebooks, norm weights), in the stored dtypes."""
        out = {}
        for index, (tunables, norms, deltas) in enumerate(zip(self.linears, self.norms, self.norm_deltas)):
            prefix = f"{self.arch.block_prefix}.{index}"
            for name, tunable in tunables.items():
                out.update({f"{prefix}.{name}.{part}": t for part, t in tunable.stored().items()})
            for name, delta in deltas.items():
                out[f"{prefix}.{name}"] = norms[name] * (1 + delta)
        out[f"{self.arch.final_norm}.weight"] = self.final_norm_weight * (1 + self.final_norm_delta)
        return {name: value.to(self.checkpoint.tensors.dtype(name)).cpu() for name, value in out.items()}


@torch.no_grad()
def float_final_hidden(source: SourceCheckpoint, arch: Architecture, runner: BlockRunner, ids: torch.Tensor,
                       progress: bool) -> torch.Tensor:
    """The float model's last block output `[W, L, H]` float32 for `ids [W, L]`, one block in memory at a time."""
    names = source.keys()
    hidden = runner.embed(ids, source.get(f"{arch.embedding}.weight"))
    for index in tqdm(range(runner.config.num_hidden_layers), desc="float model", unit="block", disable=not progress):
        tensors = dict(source.items([n for n in names if arch.block_of(n) == index]))
        hidden = runner.forward(runner.build(index, tensors, arch.block_prefix), hidden)
    return hidden


def tune_model(model: QuantizedModel, teacher: nn.Module, final: torch.Tensor, ids: torch.Tensor,
               settings: ModelTuneSettings, progress: bool = True) -> dict:
    """Fit `model`'s deltas so that its logits on `ids [W, L]` match `teacher(final)` (the float model's head
    on its last hidden states `final [W, L, H]`); the last `settings.held_out` windows only judge. Keeps the
    tuned values when the held-out KL drops, else resets them. Returns the record."""
    held_out = settings.held_out
    train = ids.shape[0] - held_out
    deltas = model.deltas()

    def held_out_kl() -> float:
        with torch.no_grad():
            return sum(next_token_kl(teacher(final[w:w + 1]), model.logits(ids[w:w + 1])).item()
                       for w in range(train, train + held_out)) / held_out

    before = held_out_kl()
    optimizer = torch.optim.Adam(deltas, lr=settings.lr)
    schedule = cosine_schedule(optimizer, settings.steps)
    order = torch.randperm(train, generator=torch.Generator().manual_seed(0))
    bar = tqdm(range(settings.steps), desc="end-to-end tuning", unit="step", disable=not progress)
    smoothed = None
    for step in bar:
        window = order[step % train].item()
        with torch.no_grad():
            target = teacher(final[window:window + 1])
        loss = next_token_kl(target, model.logits(ids[window:window + 1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(kl=f"{smoothed:.4f}", held_out_before=f"{before:.4f}")
    after = held_out_kl()
    kept = after < before
    if not kept:
        with torch.no_grad():
            for delta in deltas:
                delta.zero_()
    return {"held_out_kl_before": float(f"{before:.6g}"), "held_out_kl_after": float(f"{after:.6g}"), "kept": kept}


def _tuned_manifest(checkpoint: NanoCheckpoint, source: SourceCheckpoint, tuned: dict[str, torch.Tensor]) -> dict:
    """The checkpoint's manifest with `rel_error` recomputed against the source weight for every module among
    the `tuned` tensors (sizes and everything else unchanged: tuning changes values only)."""
    manifest = {**checkpoint.manifest, "provenance": dict(checkpoint.manifest.get("provenance", {})),
                "modules": {m: dict(r) for m, r in checkpoint.manifest["modules"].items()}}
    for module in sorted({name.rsplit(".", 1)[0] for name in tuned if name.endswith(".scales")}):
        shape = checkpoint.module_shape(module)
        scheme = checkpoint.quant_config.modules[module]
        stored = {**checkpoint.module_tensors(module),
                  **{n.rsplit(".", 1)[1]: t for n, t in tuned.items() if n.rsplit(".", 1)[0] == module}}
        original = source.get(f"{module}.weight").to(torch.float32)
        restored = dequantize(stored, scheme, *shape)
        manifest["modules"][module]["rel_error"] = round(
            (torch.linalg.norm(restored - original) / torch.linalg.norm(original).clamp_min(1e-30)).item(), 6)
    return manifest


@dataclass
class TuneResult:
    """What `tune_checkpoint` made: the output folder, its manifest and the time taken."""

    output: Path
    manifest: dict
    seconds: float


def tune_checkpoint(source_dir, nano_dir, output_dir, calibration: str, settings: ModelTuneSettings,
                    device: str = "cpu", progress: bool = True) -> TuneResult:
    """Write `output_dir`: the nano checkpoint `nano_dir` of the float model `source_dir` with its scales,
    codebook levels and norm weights tuned end to end on `calibration` text (codes, shapes and sizes
    unchanged). The manifest's rel_error values are recomputed against the source weights and its provenance
    gains `e2e_tuning`."""
    start = time.perf_counter()
    torch_device = resolve_device(device)
    source, arch = open_float_source(source_dir, instead="tune against the float model it was quantized from")
    if arch.experts is not None:
        raise NanoqError(f"{source.directory}: end-to-end tuning does not handle mixture-of-experts models yet")
    checkpoint = load_nano_checkpoint(nano_dir)
    manifest_path = Path(nano_dir) / MANIFEST_NAME
    method = checkpoint.manifest.get("provenance", {}).get("recipe", {}).get("method")
    if method in method_names() and get_method(method).folds_scales:
        raise NanoqError(f"{manifest_path}: method {method} folded scales into the float weights, so its linears no "
                         f"longer encode the source weights; tune a gptq or rtn checkpoint")
    num_layers = source.config["num_hidden_layers"]
    for module, record in checkpoint.manifest["modules"].items():
        if arch.block_of(f"{module}.weight") is not None and (
                f"{module}.weight" not in source or list(source.shape(f"{module}.weight")) != record["shape"]):
            raise NanoqError(f"{manifest_path}: module '{module}' {record['shape']} does not match the float "
                             f"model in {source.directory}")
    with CheckpointWriter(output_dir) as writer:  # refuses a non-empty OUT before any work
        runner = BlockRunner(source.config, torch_device, batch_size=4)
        ids = calibration_windows(source.directory, calibration, settings.windows + settings.held_out, settings.seq_len)
        with flush_denormals():
            final = float_final_hidden(source, arch, runner, ids, progress)
            head_name = f"{arch.lm_head}.weight"
            head = source.get(head_name if head_name in source else f"{arch.embedding}.weight").to(torch_device,
                                                                                                   torch.float32)
            float_norm = runner.final_norm(source.get(f"{arch.final_norm}.weight"))

            def teacher(hidden: torch.Tensor) -> torch.Tensor:
                return float_norm(hidden) @ head.t()

            model = QuantizedModel(checkpoint, arch, runner, num_layers, settings.recompute)
            record = tune_model(model, teacher, final, ids.to(torch_device), settings, progress)
        tuned = model.tuned_tensors() if record["kept"] else {}
        manifest = _tuned_manifest(checkpoint, source, tuned)
        seconds = time.perf_counter() - start
        manifest["provenance"]["e2e_tuning"] = {
            **settings.describe(), "calibration": calibration if calibration == SELF else str(Path(calibration).resolve()),
            **record, "tuned_tensors": len(tuned), "seconds": round(seconds, 1)}
        for name in checkpoint.tensors.keys():
            writer.add(name, tuned.get(name, checkpoint.tensors.get(name)))
        copies = [checkpoint.directory / f for f in SIDE_FILES if (checkpoint.directory / f).is_file()]
        output = writer.commit({"config.json": dict(checkpoint.tensors.config), MANIFEST_NAME: manifest}, copies)
    return TuneResult(output, manifest, seconds)
