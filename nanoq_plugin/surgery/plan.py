"""`--drop`, `--swap`, `--duplicate` -> a `LayerMap`: for every block of the new model, the source block it is.

Every operation names blocks by their index in the SOURCE model, so the operations commute and a command
line reads the same whatever its order:

- `--drop 10` removes source block 10;
- `--swap 11:12` exchanges the positions of source blocks 11 and 12;
- `--duplicate 5` runs source block 5 twice in a row (the copy shares its weights; the written checkpoint
  stores it twice).

A block may take part in one operation only (dropping a swapped block, or swapping a block twice, is
ambiguous and refused). Each flag takes one value or a comma-separated list and may be repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoqError


@dataclass(frozen=True)
class LayerMap:
    """`sources[i]` is the source block that becomes block `i` of the new model; the operations that made it
    (source indices, sorted) name it."""

    num_source_layers: int
    sources: tuple[int, ...]
    drop: tuple[int, ...] = ()
    swap: tuple[tuple[int, int], ...] = ()
    duplicate: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.sources)

    def label(self) -> str:
        """A short stable name, e.g. `drop10+swap11:12+dup5`; `baseline` when there is no operation."""
        parts = [f"drop{i}" for i in self.drop] + [f"swap{a}:{b}" for a, b in self.swap]
        parts += [f"dup{i}" for i in self.duplicate]
        return "+".join(parts) or "baseline"

    def to_dict(self) -> dict:
        return {"label": self.label(), "num_source_layers": self.num_source_layers, "sources": list(self.sources),
                "drop": list(self.drop), "swap": [list(pair) for pair in self.swap],
                "duplicate": list(self.duplicate)}


def parse_indices(values: list[str], flag: str) -> list[int]:
    """`["10", "3,4"]` -> `[10, 3, 4]`; NanoqError naming `flag` for anything that is not a block index."""
    indices = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if not item.isdigit():
                raise NanoqError(f"{flag} {value!r}: expected block indices like 10 or 3,4")
            indices.append(int(item))
    return indices


def parse_swaps(values: list[str]) -> list[tuple[int, int]]:
    """`["11:12", "3:5,7:8"]` -> `[(11, 12), (3, 5), (7, 8)]`; NanoqError for a malformed pair."""
    pairs = []
    for value in values:
        for item in str(value).split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
                raise NanoqError(f"--swap {value!r}: expected a pair of block indices like 11:12")
            a, b = (int(part) for part in parts)
            if a == b:
                raise NanoqError(f"--swap {item.strip()}: a block cannot be swapped with itself")
            pairs.append((a, b))
    return pairs


def build_layer_map(num_layers: int, drop: list[int] = (), swap: list[tuple[int, int]] = (),
                    duplicate: list[int] = ()) -> LayerMap:
    """The layer map of a model of `num_layers` blocks after the given operations (source indices).

    Raises NanoqError for an index out of range, a block named by two operations, or an empty result.
    """
    if num_layers < 1:
        raise NanoqError(f"the model has {num_layers} decoder blocks: nothing to operate on")
    named: dict[int, str] = {}

    def claim(index: int, operation: str) -> None:
        if not 0 <= index < num_layers:
            raise NanoqError(f"{operation}: block {index} is out of range (the model has {num_layers} blocks, "
                             f"0..{num_layers - 1})")
        if index in named:
            raise NanoqError(f"{operation}: block {index} is already named by {named[index]} "
                             "(a block may take part in one operation only; indices are the source model's)")
        named[index] = operation

    for index in drop:
        claim(index, f"--drop {index}")
    for a, b in swap:
        claim(a, f"--swap {a}:{b}")
        claim(b, f"--swap {a}:{b}")
    for index in duplicate:
        claim(index, f"--duplicate {index}")

    order = list(range(num_layers))
    for a, b in swap:
        order[a], order[b] = order[b], order[a]
    sources = []
    for block in order:
        if block in drop:
            continue
        sources.append(block)
        if block in duplicate:
            sources.append(block)
    if not sources:
        raise NanoqError(f"--drop removes all {num_layers} blocks: at least one must remain")
    return LayerMap(num_layers, tuple(sources), tuple(sorted(drop)),
                    tuple(sorted(tuple(sorted(pair)) for pair in swap)), tuple(sorted(duplicate)))
