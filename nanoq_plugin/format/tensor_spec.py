"""What one stored tensor is: its shape, dtype, and how an engine shards it under tensor parallelism.

Every scheme kind (format.kinds) describes the tensors it stores with these specs; engines, the checkpoint
validator and the storage accounting read only the specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Stored dtypes, looked up in torch on first use (module __getattr__): the scheme grammar and the kinds' names
# import this module, and `nanoq --help` must not wait for torch.
_DTYPES = {"SCALE_DTYPE": "float16", "ZERO_DTYPE": "uint8", "NVFP4_SCALE_DTYPE": "float8_e4m3fn"}


def __getattr__(name: str):
    if name in _DTYPES:
        import torch

        return getattr(torch, _DTYPES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Sharding(str, Enum):
    """How a stored tensor of a linear with `N` outputs and `K` inputs splits under tensor parallelism."""

    INPUT_OUTPUT = "input_output"  # `[K', N]` (K' a multiple-of-K row count): rows along K, columns along N
    OUTPUT = "output"  # `[N]`: split with the outputs, whole on every rank when the inputs split
    INPUT = "input"  # `[K]`: split with the inputs, whole on every rank when the outputs split
    PART_TABLE = "part_table"  # one small table per checkpoint module a fused engine layer holds; never split
    REPLICATED = "replicated"  # whole on every rank


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one stored tensor, and its sharding."""

    shape: tuple[int, ...]
    dtype: "torch.dtype"
    sharding: Sharding = Sharding.INPUT_OUTPUT

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


def stored_bytes(specs: dict[str, TensorSpec]) -> int:
    """Bytes the tensors of `specs` take on disk (safetensors data, headers not counted)."""
    total = 0
    for spec in specs.values():
        count = 1
        for dim in spec.shape:
            count *= dim
        total += count * spec.dtype.itemsize
    return total


def expand_groups(per_group: "torch.Tensor", group_size: int) -> "torch.Tensor":
    """`[K/G, N]` -> `[K, N]` by repeating each group row G times."""
    return per_group.repeat_interleave(group_size, dim=0)


# elements of one step of a [rows, width] computation done in row steps: its temporaries (4 MiB in float32)
# stay few and small whatever the matrix (an 8B down_proj's whole [K, N] is 235 MB per float32 temporary, and
# its encoding makes four), and below glibc's mmap threshold, so that each is not a fresh zero-filled mapping
STEP_ELEMENTS = 2**20


def row_steps(rows: int, width: int, multiple: int = 1) -> list[tuple[int, int]]:
    """`[start, end)` ranges covering `rows` rows of `width` elements, about STEP_ELEMENTS elements each, every
    start a multiple of `multiple` (a group, a packing block)."""
    step = max(multiple, STEP_ELEMENTS // max(width, 1) // multiple * multiple)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]
