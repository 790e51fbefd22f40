"""The controller's policy (docs/controller.md): pure, no Ray, no torch, no clock of its own.

`decide(snapshot, config, state) -> (actions, state)`, config being the application config's
controller section (serving/config.py::ControllerConfig), as Ray Serve's autoscaling policy is
written: the caller passes the time in the snapshot, so tests drive it with a fake clock.

Pressure on a shard is either its measured use over the high watermark of its budget, or its
node's free memory under a floor. The policy acts only after `readings` consecutive readings
under pressure, then keeps quiet for `quiet_s`; a compression it raised comes back down only
after `relax_s` without any pressure, one step at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from serving.config import ControllerConfig
from shards.plan.layer_range import LayerRange
from shards.plan.plan import Action, MoveLayers, Recompress, SplitShard
from shards.runtime.stats import ShardStats

MiB = 1 << 20


@dataclass(frozen=True)
class ShardReading:
    """One shard's measured numbers at one poll (bytes)."""

    index: int
    name: str                      # actor name: stable across moves and splits
    start: int
    end: int
    compression: str
    used_bytes: int                # RSS minus the runtime measured before any weight loaded
    weight_bytes: int
    layer_bytes: int               # mean bytes of one of its decoder layers (weights + KV pool)
    runtime_bytes: int             # RSS of a shard process before weights (a new actor costs this)
    budget_bytes: int | None
    node: str | None
    node_available_bytes: int

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Snapshot:
    time: float                    # seconds, any monotonic origin
    n_layers: int                  # layers of the model
    shards: tuple[ShardReading, ...]


@dataclass(frozen=True)
class PolicyState:
    over: dict[str, int] = field(default_factory=dict)      # consecutive pressured readings, by name
    low: dict[str, int] = field(default_factory=dict)       # least use seen in that streak, bytes
    last_action: float = -math.inf
    calm_since: float | None = None                          # first reading of the current calm spell
    raised: dict[str, str] = field(default_factory=dict)     # name -> compression before we raised it


def pressure(r: ShardReading, cfg: ControllerConfig) -> str | None:
    """Why this shard is under pressure (with the numbers), or None."""
    if r.budget_bytes is not None and r.used_bytes > cfg.high_watermark * r.budget_bytes:
        return (f"shard {r.index} uses {r.used_bytes / MiB:.0f} MiB of its {r.budget_bytes / MiB:.0f} MiB "
                f"budget ({r.used_bytes / r.budget_bytes:.0%} > {cfg.high_watermark:.0%})")
    if r.node_available_bytes < cfg.min_node_free_bytes:
        return (f"node {r.node} of shard {r.index} has {r.node_available_bytes / MiB:.0f} MiB free "
                f"(< {cfg.min_node_free_bytes / MiB:.0f} MiB)")
    return None


def decide(snap: Snapshot, cfg: ControllerConfig, state: PolicyState) -> tuple[list[Action], PolicyState]:
    reasons = {r.name: pressure(r, cfg) for r in snap.shards}
    over = {r.name: state.over.get(r.name, 0) + 1 if reasons[r.name] else 0 for r in snap.shards}
    # an action is sized by the least use of the streak: a transient peak (a big prefill) must
    # not move more layers than the pressure that lasted
    low = {r.name: min(state.low.get(r.name, r.used_bytes), r.used_bytes) for r in snap.shards if reasons[r.name]}
    calm = not any(reasons.values())
    calm_since = (state.calm_since if state.calm_since is not None else snap.time) if calm else None
    state = replace(state, over=over, low=low, calm_since=calm_since)
    if snap.time - state.last_action < cfg.quiet_s:
        return [], state
    hot = [r for r in snap.shards if over[r.name] >= cfg.readings]
    if hot:
        r = max(hot, key=lambda x: low[x.name] / (x.budget_bytes or math.inf))
        action = relieve(replace(r, used_bytes=low[r.name]), snap, cfg, reasons[r.name])
        if action is None:
            return [], state
        raised = dict(state.raised)
        if isinstance(action, Recompress):
            raised.setdefault(r.name, r.compression)
        return [action], replace(state, last_action=snap.time, over={}, low={}, raised=raised)
    if calm and state.raised and snap.time - calm_since >= cfg.relax_s:
        return _relax(snap, cfg, state)
    return [], state


def relieve(r: ShardReading, snap: Snapshot, cfg: ControllerConfig, why: str) -> Action | None:
    """The first allowed action (cfg.actions order) that takes shard r under the low watermark."""
    need = _excess(r, cfg)
    for kind in cfg.actions:
        if kind == "move":
            action = _move(r, snap, cfg, need, why)
        elif kind == "split":
            action = _split(r, snap, cfg, why)
        else:
            action = _raise(r, cfg, need, why)
        if action is not None:
            return action
    return None


def _excess(r: ShardReading, cfg: ControllerConfig) -> int:
    """Bytes shard r must give up to sit at the low watermark of its budget (or to give its
    node back its free-memory floor)."""
    need = 0
    if r.budget_bytes is not None:
        need = r.used_bytes - int(cfg.low_watermark * r.budget_bytes)
    floor = r.node_available_bytes - cfg.min_node_free_bytes
    return max(need, -floor, 1)


def _headroom(nb: ShardReading, r: ShardReading, cfg: ControllerConfig) -> float:
    """Bytes neighbour nb can take on. Moving within one node gives that node nothing back, so
    for node pressure only a neighbour on another node helps."""
    room = math.inf if nb.budget_bytes is None else cfg.low_watermark * nb.budget_bytes - nb.used_bytes
    node_room = nb.node_available_bytes - cfg.min_node_free_bytes
    if nb.node == r.node and r.node_available_bytes < cfg.min_node_free_bytes:
        return 0
    return min(room, node_room)


def _move(r: ShardReading, snap: Snapshot, cfg: ControllerConfig, need: int, why: str) -> MoveLayers | None:
    if not r.layer_bytes:
        return None
    n = math.ceil(need / r.layer_bytes)
    if n >= r.n_layers:
        return None
    best = None
    for nb in snap.shards:
        if abs(nb.index - r.index) != 1:
            continue
        room = _headroom(nb, r, cfg) - n * (nb.layer_bytes or r.layer_bytes)  # moved layers take nb's compression
        if room >= 0 and (best is None or room > best[0]):
            best = (room, nb)
    if best is None:
        return None
    dst = best[1].index
    layers = LayerRange(r.end - n, r.end) if dst > r.index else LayerRange(r.start, r.start + n)
    return MoveLayers(r.index, dst, layers,
                      f"{why}: {n} layers of ~{r.layer_bytes / MiB:.0f} MiB to shard {dst} "
                      f"(free {need / MiB:.0f} MiB)")


def _split(r: ShardReading, snap: Snapshot, cfg: ControllerConfig, why: str) -> SplitShard | None:
    if len(snap.shards) >= cfg.max_shards or r.n_layers < 2:
        return None
    if r.start == 0 and r.end == snap.n_layers:
        return None
    cost = r.runtime_bytes + (r.n_layers // 2) * r.layer_bytes
    if r.node_available_bytes - cost < cfg.min_node_free_bytes:
        return None
    return SplitShard(r.index, f"{why}: no neighbour has room; a new actor takes {r.n_layers // 2} layers "
                               f"(~{cost / MiB:.0f} MiB with its runtime)")


def _step(cfg: ControllerConfig, spec: str) -> int | None:
    return cfg.ladder.index(spec) if spec in cfg.ladder else None


def _raise(r: ShardReading, cfg: ControllerConfig, need: int, why: str) -> Recompress | None:
    i = _step(cfg, r.compression)
    if i is None:
        return None
    for j in range(i + 1, len(cfg.ladder)):
        saved = r.weight_bytes * (1 - cfg.ladder_bytes[j] / cfg.ladder_bytes[i])
        if saved >= need or j == len(cfg.ladder) - 1:
            return Recompress(r.index, cfg.ladder[j],
                              f"{why}: {r.compression} -> {cfg.ladder[j]} saves ~{saved / MiB:.0f} MiB")
    return None


def _relax(snap: Snapshot, cfg: ControllerConfig, state: PolicyState) -> tuple[list[Action], PolicyState]:
    """Lower one raised shard's compression one ladder step (the last one back to the spec it
    had), if it would still fit."""
    for r in snap.shards:
        orig = state.raised.get(r.name)
        i, o = _step(cfg, r.compression), orig and _step(cfg, orig)
        if orig is None or i is None or o is None or i <= o:
            continue
        grown = r.weight_bytes * (cfg.ladder_bytes[i - 1] / cfg.ladder_bytes[i] - 1)
        fits_budget = r.budget_bytes is None or r.used_bytes + grown <= cfg.low_watermark * r.budget_bytes
        if not fits_budget or r.node_available_bytes - grown < cfg.min_node_free_bytes:
            continue
        raised = dict(state.raised)
        to = orig if i - 1 == o else cfg.ladder[i - 1]
        if to == orig:
            del raised[r.name]
        calm_for = snap.time - state.calm_since
        action = Recompress(r.index, to, f"no pressure for {calm_for:.0f} s: {r.compression} -> {to} "
                                         f"(+{grown / MiB:.0f} MiB fits)")
        return [action], replace(state, last_action=snap.time, calm_since=snap.time, raised=raised)
    return [], state


def least_bytes(r: ShardReading, cfg: ControllerConfig | None, snap: Snapshot | None = None) -> tuple[int, str]:
    """The least shard r can be made to use, and at which spec. Its layers at the most compressed
    ladder step it may be raised to (its own spec when recompression is off or its spec is off
    the ladder), plus what it holds besides them; less the layers the allowed actions can take
    away (`shed`). A budget under this cannot be met by any action (docs/controller.md)."""
    i = None if cfg is None or "recompress" not in cfg.actions else _step(cfg, r.compression)
    ratio, spec = 1.0, r.compression
    if i is not None and cfg.ladder_bytes:
        ratio, spec = cfg.ladder_bytes[-1] / cfg.ladder_bytes[i], cfg.ladder[-1]
    saved = r.weight_bytes - int(r.weight_bytes * ratio)
    per_layer = r.layer_bytes - saved // max(r.n_layers, 1)    # one layer at the spec above
    gone = shed(r, cfg, snap) * max(per_layer, 0)
    return max(r.used_bytes - saved - gone, 0), spec


def shed(r: ShardReading, cfg: ControllerConfig | None, snap: Snapshot | None) -> int:
    """How many of shard r's layers moves to its neighbours (their headroom, each layer at the
    neighbour's size) or one split (half of them, where the node has room for a new actor) can
    take away; a shard keeps at least one layer."""
    if cfg is None or snap is None or not r.layer_bytes:
        return 0
    moved = 0
    if "move" in cfg.actions:
        for nb in snap.shards:
            if abs(nb.index - r.index) == 1:
                room = _headroom(nb, r, cfg)
                size = nb.layer_bytes or r.layer_bytes
                moved += r.n_layers if math.isinf(room) else max(int(room // size), 0)
    split = 0
    if "split" in cfg.actions and _split(r, snap, cfg, "") is not None:
        split = r.n_layers // 2
    return min(max(moved, split), r.n_layers - 1)


def acted(state: PolicyState, now: float) -> PolicyState:
    """An action finished: the quiet period counts from now, and readings start over."""
    return replace(state, last_action=now, over={}, low={})


def reading(index: int, name: str, st: ShardStats) -> ShardReading:
    """A ShardReading from a shard actor's stats()."""
    return ShardReading(
        index=index, name=name, start=st.start, end=st.end, compression=st.compression,
        used_bytes=st.used_bytes, weight_bytes=st.weight_bytes, layer_bytes=st.layer_bytes,
        runtime_bytes=st.base_rss_bytes, budget_bytes=st.budget_bytes, node=st.node,
        node_available_bytes=st.node_available_bytes)
