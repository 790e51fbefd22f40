"""How many cores a CPU shard's step takes (docs/performance.md, "Memory and threads").

Shards of one node share its cores: each steps on its share (`CoreShare.threads`, the node's
cores over its shards), and a step no other group overlaps (`StepBatch.alone`) may take the
others, through torch's threads or through the 4-bit kernel's team (`qmatmul.team`). Plain
functions over the spec and the step's shape; the actor applies what they return.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from shards.compress.spec import parse as parse_compression
from shards.plan.plan import ShardSpec

# A decode step no other group overlaps takes every core of the node when the shard's weights
# (what a decode step reads) are at least this large; its OpenMP threads then sleep as soon as a
# region ends (GOMP_SPINCOUNT=0), so a shard that finished its step leaves the cores to the next.
# Measured at concurrency 1, 2 shards on 2 cores, 4 interleaved server runs each: Llama-3.2-1B
# shape (644 / 499 MiB a shard) 9.8 -> 11.3 tok/s (c=8 35.6 -> 38.8, c=32 64.7 -> 65.8); the
# default model (71 / 54 MiB) 43.1 -> 33.9: a small step loses more to the threads' wake-ups
# than it gains. Without the spin limit the other shard's spinning worker made a 2-thread step
# ~2x slower.
ALONE_DECODE_BYTES = 256 << 20
# A shard whose projections run our 4-bit kernel (`Method.kernel_team`) takes the other cores for
# a decode step no other group overlaps through the kernel's team (qmatmul.team): helpers that
# wait between the step's kernel calls and sleep after it, so no wake-ups, and one set of graphs.
# A helper yields its core to any other runnable thread and nothing waits for it, so it takes
# only cores no one else wants: the first shard's step at c=1 overlaps the previous token's
# delivery (the router, Serve's proxy, the client), which keeps the other core. Measured over
# HTTP, 2 shards: Llama-3.2-1B shape, servers in the order T B B T, against every core through
# torch's threads, c=1 10.4 -> 12.4 tok/s (ITL 92 -> 75 ms), c=8 35.7 -> 34.2, c=32 57.6 -> 60.7;
# the default model (71 / 54 MiB) at c=1 on an EPYC, 6 alternating rounds in one server each:
# without the team on the last shard ITL p50 6.20-7.11 ms, with it 5.63-6.05 (lower in every
# round); the team on the first shard too, 6.37-6.78 against 6.16-6.79 (no difference).
# SHARDSERVE_KERNEL_TEAM=0 turns it off (bench/decode_threads.py's A/B).
KERNEL_TEAM = os.environ.get("SHARDSERVE_KERNEL_TEAM", "1") != "0"
# Such a shard's steps that other groups overlap lend its helpers to a kernel call only while no
# other shard process of the machine steps (qmatmul.lend): at c=8 and c=32 the two shards' steps
# differ in length (the last one samples, the first prefills more layers), so each waits for the
# other part of the time, its core idle. SHARDSERVE_LEND=0 turns it off (A/B runs).
LEND = os.environ.get("SHARDSERVE_LEND", "1") != "0"
# An alone prefill of at most this many new tokens on such a shard takes the team too, with one
# torch thread, instead of torch's threads on every core. Its OpenMP worker has slept through the
# decode steps before it and then waits at each region's barrier whenever the core it needs runs
# the router or Serve's proxy (they take the new request while the first shard prefills); a
# helper is never waited for. Larger prefills gain more from parallel attention and element-wise
# ops than the waits cost. Measured in docs/performance.md ("Short prefills on the team").
# SHARDSERVE_TEAM_PREFILL_ROWS overrides it (0: never; A/B runs).
TEAM_PREFILL_ROWS = 64


def team_prefill_rows() -> int:
    """The most new tokens an alone prefill on the team may have (read each step: A/B runs)."""
    return int(os.environ.get("SHARDSERVE_TEAM_PREFILL_ROWS", TEAM_PREFILL_ROWS))


def alone_decode_bytes() -> int:
    """The weight bytes from which a shard's alone decode steps take every core
    (SHARDSERVE_ALONE_DECODE_BYTES overrides ALONE_DECODE_BYTES: bench/decode_threads.py's A/B)."""
    return int(os.environ.get("SHARDSERVE_ALONE_DECODE_BYTES", ALONE_DECODE_BYTES))


def kernel_team(spec: ShardSpec) -> bool:
    """Whether this CPU shard's decode steps with no other group overlapping split its kernel's
    panels over every core (qmatmul.team): any shard whose projections run the 4-bit kernel."""
    return (KERNEL_TEAM and not spec.device.startswith("cuda")
            and parse_compression(spec.compression).method.kernel_team)


def decodes_alone(spec: ShardSpec) -> bool:
    """Whether this CPU shard's decode steps take every core (torch's threads) when no other
    group overlaps: a shard of alone_decode_bytes or more, unless its kernel's team does it."""
    return not spec.device.startswith("cuda") and spec.weight_bytes >= alone_decode_bytes() and not kernel_team(spec)


@dataclass(frozen=True)
class StepCores:
    """What one step runs on."""
    threads: int   # torch's intra-op threads
    team: int      # threads the 4-bit kernel's panels split over, this one included (qmatmul.team)
    lend: int      # threads a kernel call may borrow while no other shard steps (qmatmul.lend)


@dataclass(frozen=True)
class CoreShare:
    """A CPU shard's cores: its share of the node, the node's count, and how an alone step
    takes the rest."""
    threads: int         # the share: torch threads of a step other groups overlap
    all_cores: int       # the node's cores
    team: int            # >1: the shard runs the 4-bit kernel, whose team takes the other cores
    decode_alone: bool   # an alone decode step takes every core through torch's threads

    @classmethod
    def of(cls, spec: ShardSpec, threads: int, all_cores: int) -> CoreShare:
        more = all_cores > threads   # on a node of its own the share is every core already
        return cls(threads, all_cores, all_cores if more and kernel_team(spec) else 1,
                   more and decodes_alone(spec))

    def step(self, alone: bool, width: int, rows: int) -> StepCores:
        """A step of `width` new tokens per sequence (1: decode), `rows` new tokens in all."""
        if not alone:   # it takes the cores the other shards leave idle, call by call
            return StepCores(self.threads, 1, self.team if LEND else 1)
        if width == 1:
            return StepCores(self.all_cores, 1, 1) if self.decode_alone else StepCores(self.threads, self.team, 1)
        if self.team > 1 and rows <= team_prefill_rows():
            return StepCores(self.threads, self.team, 1)
        return StepCores(self.all_cores, 1, 1)
