"""The settings of the quantization methods that the command line offers, with their defaults: plain data, no
torch, so that `nanoq --help` builds its parser without importing the methods themselves."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoqError


@dataclass(frozen=True)
class GptqSettings:
    """Knobs of the algorithm (defaults follow the paper and GPTQModel)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = True  # group scales from the error-minimizing clip range (rtn.rtn_scales)
    # a mixture-of-experts expert routed fewer calibration tokens than this is calibrated on all tokens, as if
    # routed (GPTQModel's floor): a Hessian from a handful of tokens is too poorly conditioned to trust
    moe_floor_tokens: int = 256


HELD_OUT = 4  # windows kept out of training to decide whether the tuned block is better


@dataclass(frozen=True)
class TuneSettings:
    """Block-output tuning: `steps` Adam steps per block on `batch` windows each (0 steps: off), `lr` the
    rate of relative change of scales, levels and norm weights."""

    steps: int = 0
    lr: float = 5e-3
    batch: int = 2

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def describe(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "batch": self.batch, "held_out_windows": HELD_OUT,
                "target": "float block on the float model's hidden states",
                "note": f"with fewer than {4 * HELD_OUT} calibration windows a quarter of them (at least 1) is "
                        "held out: each block's record says how many"}


@dataclass(frozen=True)
class ModelTuneSettings:
    """End-to-end tuning: `steps` Adam steps of one window each over `windows` calibration windows
    (`held_out` more decide whether the result is kept), `lr` the peak rate of relative change."""

    steps: int = 0
    lr: float = 2e-3
    windows: int = 32
    held_out: int = 4
    seq_len: int = 512
    recompute: bool = True  # QuantizedModel.final_hidden: one block's activations at a time, ~1.1x the time

    def __post_init__(self) -> None:
        if self.steps < 0 or self.windows < 1 or self.held_out < 1 or not self.lr > 0:
            raise NanoqError(f"end-to-end tuning: steps ({self.steps}) must be >= 0, windows ({self.windows}) and "
                             f"held-out windows ({self.held_out}) >= 1, and the rate ({self.lr}) > 0")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def describe(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "windows": self.windows, "held_out_windows": self.held_out,
                "seq_len": self.seq_len, "recompute": self.recompute, "loss": "KL(float model || quantized model), next-token distributions"}
