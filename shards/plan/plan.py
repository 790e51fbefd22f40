"""The placement contract: ShardSpec and Plan (docs/design.md, "Memory model"). Pure, no torch, no Ray."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from shards.errors import PlanError
from shards.plan.footprint import Footprint
from shards.plan.layer_range import LayerRange

MiB = 1 << 20


@dataclass(frozen=True)
class ShardSpec:
    """One shard: which layers, how compressed, where, and its measured/planned bytes."""

    index: int
    layers: LayerRange
    compression: str = "fp32"
    device: str = "cpu"
    node: str | None = None
    weight_bytes: int = 0          # measured resident bytes of its tensors
    kv_bytes: int = 0              # KV pool it reserves
    kv_tokens: int = 0             # tokens (all sequences together) that pool holds
    budget_bytes: int | None = None
    compile: bool = False          # decode steps run the compiled layer graph (shards/model/compiled.py)
    # the rest of the process (shards/plan/footprint.py): planned, 0 where not measured
    runtime_bytes: int = 0
    compiled_bytes: int = 0
    workspace_bytes: int = 0
    transient_bytes: int = 0

    @property
    def footprint(self) -> Footprint:
        return Footprint(self.weight_bytes, self.kv_bytes, self.runtime_bytes, self.compiled_bytes,
                         self.workspace_bytes, self.transient_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("layers")
        f = self.footprint
        return {"start": self.layers.start, "end": self.layers.end, **d, "held_bytes": f.held,
                "total_bytes": f.total, "load_peak_bytes": f.load_peak}


@dataclass(frozen=True)
class MoveLayers:
    """Layers `layers` go from shard `src` to its neighbour `dst`, with their live KV."""

    src: int
    dst: int
    layers: LayerRange
    reason: str = ""     # the numbers that triggered it (controller events)


@dataclass(frozen=True)
class Recompress:
    """Shard `shard` rebuilds its layers at another quantization (live KV kept)."""

    shard: int
    compression: str
    reason: str = ""


@dataclass(frozen=True)
class SplitShard:
    """Half of shard `shard`'s layers (and their live KV) go to a new actor beside it."""

    shard: int
    reason: str = ""


@dataclass(frozen=True)
class ReplaceShard:
    """A new actor takes over shard `shard` (dead or hung): same layers and compression, no KV;
    the router recomputes every live sequence from its token history."""

    shard: int
    reason: str = ""
    unanswered_at: float | None = None   # epoch s of a ping it did not answer: no second ping
                                         # unless it was re-placed since


Action = MoveLayers | Recompress | SplitShard | ReplaceShard


@dataclass(frozen=True)
class Plan:
    """Ordered shards covering [0, n_layers) exactly once, contiguous."""

    model: str
    n_layers: int
    shards: tuple[ShardSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.shards:
            raise PlanError("a plan needs at least one shard")
        expect = 0
        for k, s in enumerate(self.shards):
            if s.index != k or s.layers.start != expect:
                raise PlanError(f"shard {k} starts at layer {s.layers.start}, expected {expect}: "
                                "shards must be contiguous and in order")
            expect = s.layers.end
        if expect != self.n_layers:
            raise PlanError(f"shards cover [0, {expect}) but the model has {self.n_layers} layers")

    @property
    def ranges(self) -> list[LayerRange]:
        return [s.layers for s in self.shards]

    def to_dict(self) -> dict:
        return {"model": self.model, "n_layers": self.n_layers,
                "shards": [s.to_dict() for s in self.shards]}


def diff(old: Plan, new: Plan) -> list[MoveLayers | Recompress]:
    """Actions that turn `old` into `new` when both have the same number of shards:
    boundary moves between neighbours, then compression changes."""
    if len(old.shards) != len(new.shards):
        raise PlanError(f"diff needs equal shard counts, got {len(old.shards)} and {len(new.shards)}; "
                        "adding or removing shards is a placement of a new actor, not a move")
    actions: list[MoveLayers | Recompress] = []
    for k in range(len(old.shards) - 1):
        b_old, b_new = old.shards[k].layers.end, new.shards[k].layers.end
        if b_new < b_old:
            actions.append(MoveLayers(k, k + 1, LayerRange(b_new, b_old)))
        elif b_new > b_old:
            actions.append(MoveLayers(k + 1, k, LayerRange(b_old, b_new)))
    actions += [Recompress(n.index, n.compression) for o, n in zip(old.shards, new.shards)
                if o.compression != n.compression]
    return actions
