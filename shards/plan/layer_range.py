"""The one range type: a half-open run of decoder layers [start, end)."""
from __future__ import annotations

from dataclasses import dataclass

from shards.errors import RangeError


@dataclass(frozen=True, order=True)
class LayerRange:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise RangeError(f"layer range bounds must be ints, got [{self.start!r}, {self.end!r})")
        if self.start < 0 or self.end <= self.start:
            raise RangeError(f"layer range [{self.start}, {self.end}) is empty or negative")

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    def check_within(self, n_layers: int) -> "LayerRange":
        """Raise unless this range lies inside [0, n_layers)."""
        if self.end > n_layers:
            raise RangeError(f"layer range {self} lies outside [0, {n_layers}) of this model")
        return self

    def is_first(self) -> bool:
        return self.start == 0

    def is_last(self, n_layers: int) -> bool:
        return self.end == n_layers


def split_even(n_layers: int, n_shards: int) -> list[LayerRange]:
    """n_layers split into n_shards contiguous ranges whose sizes differ by at most one."""
    if n_shards < 1:
        raise RangeError(f"need at least one shard, got {n_shards}")
    if n_shards > n_layers:
        raise RangeError(f"{n_shards} shards for {n_layers} layers: each shard needs at least one layer")
    base, extra = divmod(n_layers, n_shards)
    ranges, start = [], 0
    for k in range(n_shards):
        end = start + base + (1 if k < extra else 0)
        ranges.append(LayerRange(start, end))
        start = end
    return ranges
