"""GPTQ (Frantar et al., 2022): quantize one linear column by column, feeding each column's rounding error
back into the columns not yet quantized through the inverse Hessian of the layer's inputs.

- Hessian `H = 2/n · Σ xᵀx` over calibration inputs `x [n, K]` (see `HessianAccumulator`).
- Dampening: `H += damp · mean(diag H) · I`; inputs that never fire (zero diagonal) get weight 0.
- Act-order with static groups: columns are processed by decreasing `diag H`, but every group's scale
  (and zero) is fixed before the loop from the group's original weights (the RTN range, shrunk by the
  clip search unless `clip_search=False`), so the stored
  format needs no permutation index at inference.
- Lazy batch updates over blocks of `block_size` columns (the paper's section 3.2).

Works for every integer scheme of `format` (group-wise sym/asym and int8 per channel): the algorithm only
needs the scheme's scales; packing happens once at the end (`format.reference.compress`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ..errors import NanoqError
from ..format.layout import SCALE_DTYPE
from ..format.reference import compress, symmetric_zero
from ..format.schemes import Scheme, SchemeKind
from .rtn import rtn_scales
from .settings import GptqSettings


class HessianAccumulator:
    """Running `H = 2/n · Σ xᵀx` of a linear's inputs (float32 `[K, K]`).

    Only the blocks on and above the diagonal (in tiles of TILE rows) are accumulated, ~0.6x the work of a
    full `xᵀx`; `hessian` mirrors them into the full symmetric matrix.
    """

    TILE = 128

    def __init__(self, in_features: int, device: torch.device) -> None:
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs `[..., K]` (any float dtype); every leading index counts as one sample."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        total = self.samples + x.shape[0]
        self._upper.mul_(self.samples / total)
        x = x * (2.0 / total) ** 0.5
        for start in range(0, x.shape[1], self.TILE):
            self._upper[start:start + self.TILE, start:].addmm_(x[:, start:start + self.TILE].t(), x[:, start:])
        self.samples = total

    @property
    def hessian(self) -> torch.Tensor:
        """The symmetric `[K, K]` float32 Hessian (a new tensor; the accumulator goes on)."""
        upper = torch.triu(self._upper)
        return upper + torch.triu(upper, diagonal=1).t()

    def take(self) -> torch.Tensor:
        """The symmetric `[K, K]` float32 Hessian, made in place from the accumulated tiles: no second `[K, K]`
        copy (0.8 GB for an 8B down_proj). The accumulator is used up."""
        h, self._upper = self._upper, None
        k = h.shape[0]
        for start in range(0, k, self.TILE):  # mirror the upper triangle down, one tile column at a time
            end = min(start + self.TILE, k)
            tile = h[start:end, start:end]
            tile.copy_(torch.triu(tile) + torch.triu(tile, diagonal=1).t())
            h[end:, start:end] = h[start:end, end:].t()
        return h


def _column_quant_params(scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme
                         ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Input column k -> its scale and zero point `[N]` float32, from the stored-precision group parameters
    (views of `[K/G, N]` rows: no `[K, N]` copy, 0.2 GB each for an 8B projection)."""
    stored = scales.to(SCALE_DTYPE).to(torch.float32)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        s = stored.view(-1)
        z = torch.zeros_like(s)
        return lambda k: (s, z)
    g = scheme.group_size
    if zeros is None:
        z = torch.full_like(stored[0], float(symmetric_zero(scheme.bits)))
        return lambda k: (stored[k // g], z)
    zero_points = zeros.to(torch.float32)
    return lambda k: (stored[k // g], zero_points[k // g])


def _fake_quantize(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return torch.clamp(torch.round(column / scale), -127, 127) * scale
    max_code = (1 << scheme.bits) - 1
    return (torch.clamp(torch.round(column / scale) + zero, 0, max_code) - zero) * scale


# fake_quantize(column [N] float32, k) -> the column's quantized values [N] (on the stored grid of input k)
ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


@contextmanager
def flush_denormals():
    """Treat denormal floats as zero on the CPU inside the block (restored after)."""
    flushing = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def check_hessian(weight: torch.Tensor, hessian: torch.Tensor, where: str) -> None:
    """NanoqError naming `where` unless `hessian` is `[K, K]` for `weight [N, K]`."""
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise NanoqError(f"{where}: Hessian is {list(hessian.shape)}, expected [{k}, {k}]")


class PreparedHessian(NamedTuple):
    """A Hessian made ready for the GPTQ loop, the same for every linear that reads the same inputs (a group's
    q/k/v or gate/up share one): `order [K]` int64 the column order (decreasing `diag H` with act-order),
    `dead [K]` bool the inputs that never fire, `inverse_factor [K, K]` float32 the upper Cholesky factor of the
    damped inverse Hessian, in `order`."""

    order: torch.Tensor
    dead: torch.Tensor
    inverse_factor: torch.Tensor


# Rows (or columns) moved per step of an in-place permutation: its temporary is 256 x K float32.
PERMUTE_CHUNK = 256


def permute_columns_(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`x [N, K]` overwritten by `x[:, order]` (returned), through a temporary of `PERMUTE_CHUNK` rows: a
    column permutation acts within each row."""
    for start in range(0, x.shape[0], PERMUTE_CHUNK):
        x[start:start + PERMUTE_CHUNK] = x[start:start + PERMUTE_CHUNK, order]
    return x


def permute_symmetric_(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`h [K, K]` overwritten by `h[order][:, order]` (returned) with no K x K temporary."""
    permute_columns_(h.mT, order)  # the rows of h
    return permute_columns_(h, order)


def inverse_factor_(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor `U` of `h⁻¹` (`h⁻¹ = Uᵀ U`) for a symmetric positive definite float32
    `h [K, K]`, computed in h's memory and returned as a column-major view of it (h is destroyed).

    Why the view: LAPACK works on column-major matrices, and torch writes an `out=` tensor that has that layout
    in place; a row-major one it would factor in a K x K temporary (0.8 GB for an 8B model's down_proj). h is
    symmetric, so its column-major view is the same matrix. Raises torch.linalg.LinAlgError if h is not
    positive definite."""
    factor = h.mT
    torch.linalg.cholesky(factor, out=factor)  # lower L, h = L Lᵀ
    torch.cholesky_inverse(factor, out=factor)  # h⁻¹
    torch.linalg.cholesky(factor, upper=True, out=factor)
    return factor


def prepare_hessian(hessian: torch.Tensor, settings: GptqSettings = GptqSettings(), where: str = "linear",
                    in_place: bool = False) -> PreparedHessian:
    """`hessian [K, K]` ready for the GPTQ loop. With `in_place` the caller gives a float32 `hessian` away and
    it becomes the inverse factor: no other `[K, K]` tensor is made (an 8B down_proj's is 0.8 GB); without,
    one copy."""
    h = hessian if in_place and hessian.dtype == torch.float32 else hessian.to(torch.float32, copy=True)
    del hessian
    k = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True) if settings.act_order else torch.arange(k, device=h.device)
    if settings.act_order:
        permute_symmetric_(h, order)
    h.diagonal().add_(settings.damp * torch.mean(torch.diag(h)))
    with flush_denormals():  # tiny inverse-Hessian entries (e.g. after AWQ scaling) are 100x slower as denormals
        try:
            inverse_factor = inverse_factor_(h)
        except torch.linalg.LinAlgError:
            raise NanoqError(f"{where}: the Hessian is not positive definite even with damping {settings.damp} "
                             "(raise it, or use more calibration data)") from None
    return PreparedHessian(order, dead, inverse_factor)


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, fake_quantize: ColumnQuantizer,
               settings: GptqSettings = GptqSettings(), where: str = "linear", in_place: bool = False) -> torch.Tensor:
    """The GPTQ loop: quantize `weight [N, K]` column by column with `fake_quantize`, spreading each column's
    error over the later columns through the inverse of `hessian [K, K]` (or its `prepare_hessian`, shared by the
    linears of a group); returns the quantized weight `[N, K]` float32 (every column on its grid). Inputs with a
    zero Hessian diagonal get weight 0. With `in_place` the caller gives a float32 `weight` away and it becomes
    the result; without, one copy."""
    prepared = _prepared(weight, hessian, settings, where)
    order = prepared.order.to(weight.device)
    # the one working copy: permuted, quantized and restored in place
    w = weight if in_place and weight.dtype == torch.float32 else weight.to(torch.float32, copy=True)
    del weight
    w[:, prepared.dead.to(w.device)] = 0.0
    permute_columns_(w, order)
    with flush_denormals():
        _gptq_loop(w, prepared.inverse_factor.to(w.device), order.tolist(), fake_quantize, settings.block_size)
    return permute_columns_(w, torch.argsort(order))


def _prepared(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, settings: GptqSettings,
              where: str) -> PreparedHessian:
    """`hessian` prepared for `weight [N, K]` (as given when it comes prepared); NanoqError unless it is K x K."""
    if not isinstance(hessian, PreparedHessian):
        check_hessian(weight, hessian, where)
        hessian = prepare_hessian(hessian, settings, where)
    check_hessian(weight, hessian.inverse_factor, where)
    return hessian


def _gptq_loop(w: torch.Tensor, h_inv: torch.Tensor, original_index: list[int], fake_quantize: ColumnQuantizer,
               block_size: int) -> None:
    """The column loop of GPTQ with lazy block updates (section 3.2 of the paper), in place: each block of
    columns of `w [N, K]` is replaced by its quantized values once the block is done (the later columns have
    taken its error by then, and nothing reads the block again)."""
    k = w.shape[1]
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = block[:, i].clone()
            q = fake_quantize(column, original_index[start + i])
            block[:, i] = q
            error = (column - q) / h_block[i, i]
            block[:, i + 1:] -= error.unsqueeze(1) * h_block[i, i + 1:].unsqueeze(0)
            errors[:, i] = error
        w[:, start:end] = block
        # in place: the product alone would be an [N, K] float32 temporary (235 MB for an 8B down_proj)
        w[:, end:].addmm_(errors, h_inv[start:end, end:], alpha=-1.0)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, scheme: Scheme,
    settings: GptqSettings = GptqSettings(), where: str = "linear",
) -> dict[str, torch.Tensor]:
    """GPTQ-quantize `weight [N, K]` with the input Hessian `hessian [K, K]` into the stored tensors of an
    integer `scheme` (group-wise or int8 per channel); `hessian` may come prepared (`prepare_hessian`)."""
    prepared = _prepared(weight, hessian, settings, where)
    w = weight.to(torch.float32, copy=True)  # the working copy gptq_solve is given
    # a dead input's weights are not quantized (they get 0): they must not widen their group's range
    w[:, prepared.dead.to(w.device)] = 0.0
    scales, zeros = rtn_scales(w, scheme, settings.clip_search)
    column_params = _column_quant_params(scales, zeros, scheme)
    restored = gptq_solve(w, prepared, lambda column, k: _fake_quantize(column, *column_params(k), scheme),
                          settings, where, in_place=True)
    return compress(restored, scheme, scales, zeros)
