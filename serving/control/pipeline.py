"""One pipeline: its shards (ShardSet), the Transport that steps them and the Reconfigurer that
changes them. The router (serving/router/engine.py) launches steps through `transport` and
carries out the controller's actions through `reconfigure`."""
from __future__ import annotations

from dataclasses import dataclass

from serving.config import ControllerConfig
from serving.control.reconfigurer import ActionError, BudgetTooSmall, Reconfigurer, ShardUnanswered
from serving.control.shardset import ShardSet, describe
from serving.control.transport import ShardLost, Transport
from shards.plan.plan import Plan

__all__ = ["ActionError", "BudgetTooSmall", "Pipeline", "ShardUnanswered", "ShardLost", "ShardSet", "describe"]


@dataclass
class Pipeline:
    shards: ShardSet
    transport: Transport
    reconfigure: Reconfigurer

    @classmethod
    def of(cls, model: str, plan: Plan, handles: list, kv_blocks: int, block_size: int, prefix: str = "",
           compiled_graph: bool = False, channels: bool = True,
           controller: ControllerConfig | None = None, names: list[str] | None = None) -> "Pipeline":
        """names: the actors' names in pipeline order (default <prefix>shard-<index>)."""
        shards = ShardSet(model, plan, handles, kv_blocks, block_size, prefix, list(names or []))
        transport = Transport(shards, compiled_graph, channels)
        return cls(shards, transport, Reconfigurer(shards, transport, controller))

    def close(self, wait: bool = False) -> None:
        """Stop stepping (channels closed, a Compiled Graph torn down); the actors stay up."""
        self.transport.close(wait)
