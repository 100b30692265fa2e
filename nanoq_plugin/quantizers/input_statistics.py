"""What the calibrated methods need to know about a group of linears' inputs, accumulated chunk by chunk as the
block runs, so that the inputs themselves are never held: at 8B, `down_proj`'s input over 128 x 512 calibration
tokens is 3.8 GB in float32, its Hessian 0.8 GB."""

from __future__ import annotations

import torch

from .gptq import HessianAccumulator


class InputStatistics:
    """Running statistics of inputs `[..., K]`: the Hessian `H = 2/n · Σ xᵀx` (float32 `[K, K]`) and the mean
    `|x|` per input channel (float32 `[K]`); every leading index of an added chunk is one sample."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self._hessian: HessianAccumulator | None = HessianAccumulator(in_features, device)
        self._finished: torch.Tensor | None = None
        self._abs_sum = torch.zeros(in_features, device=device)
        self.samples = 0

    @classmethod
    def of(cls, inputs: torch.Tensor) -> InputStatistics:
        """The statistics of one tensor of inputs `[..., K]`."""
        statistics = cls(inputs.shape[-1], inputs.device)
        statistics.add(inputs)
        return statistics

    def add(self, chunk: torch.Tensor) -> None:
        """Add the inputs `chunk [..., K]` (any float dtype)."""
        if self._hessian is None:
            raise ValueError("inputs added after the Hessian was read")
        self._hessian.add(chunk)
        self._abs_sum += chunk.abs().to(torch.float32).sum(dim=tuple(range(chunk.dim() - 1)))
        self.samples = self._hessian.samples

    @property
    def hessian(self) -> torch.Tensor:
        """The symmetric Hessian `[K, K]` float32, shared by every reader (copy it to change it); no input can
        be added after it is read (it is finished in place, without a second `[K, K]` copy)."""
        if self._finished is None:
            self._finished, self._hessian = self._hessian.take(), None
        return self._finished

    def release_hessian(self) -> torch.Tensor:
        """The Hessian, given away: the statistics no longer hold it, so that a caller which changes it in
        place (GPTQ's factorisation) holds the only copy."""
        hessian, self._finished = self.hessian, None
        return hessian

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean `|x|` per input channel, float32 `[K]`."""
        return self._abs_sum / max(self.samples, 1)
