"""The application's arguments (deploy/serve.yaml's `args`, `build_app`, the CLI), typed and
validated: a bad field is refused with its name and what it accepts."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.control.policy import ControllerConfig
from serving.launch import EngineConfig
from serving.units import parse_bytes
from shards.errors import ShardServeError

CONTROLLER_FIELDS = {f.name for f in dataclasses.fields(ControllerConfig)}


def _bytes(v: int | str | None) -> int | None:
    """300MiB -> bytes; pydantic reports a ValueError with the field's name."""
    try:
        return parse_bytes(v) if isinstance(v, str) else v
    except ShardServeError as e:
        raise ValueError(str(e)) from None


class ControllerArgs(BaseModel):
    """serving.control.policy.ControllerConfig's settings; omitted ones keep its defaults."""

    model_config = ConfigDict(extra="forbid")
    high_watermark: float | None = Field(None, gt=0, le=1)
    low_watermark: float | None = Field(None, gt=0, le=1)
    readings: int | None = Field(None, ge=1)
    quiet_s: float | None = Field(None, ge=0)
    relax_s: float | None = Field(None, ge=0)
    min_node_free_bytes: int | str | None = None
    actions: list[Literal["move", "split", "recompress"]] | None = None
    ladder: list[str] | None = None           # default: the registry's, ordered by measured bytes
    ladder_bytes: list[float] | None = None   # with ladder: a layer's bytes at each step / the first's
    max_shards: int | None = Field(None, ge=1)

    @field_validator("min_node_free_bytes")
    @classmethod
    def _size(cls, v):
        return _bytes(v)

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, v):
        from shards.compress.spec import parse
        for spec in v or []:
            parse(spec)
        return v

    @model_validator(mode="after")
    def _whole(self):
        ControllerConfig(**self.settings())   # its own checks: watermark order, ladder lengths
        return self

    def settings(self) -> dict:
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


class AppConfig(BaseModel):
    """What one shardserve application serves and how."""

    model_config = ConfigDict(extra="forbid")
    model: str = "default"
    model_name: str | None = None          # the id /v1/models shows (default shardserve-<model>)
    shards: int | Literal["auto"] = Field(2, description="layer ranges per pipeline; auto: one per node")
    compression: str | None = None         # shards/compress/spec.py spec or preset
    budgets: list[int | str] | None = None  # per shard: bytes or "300MiB"
    kv_tokens: int = Field(8192, ge=16)
    block_size: int = Field(16, ge=1, le=1024)
    max_batch: int = Field(32, ge=1, le=1024)
    prefill_tokens: int = Field(256, ge=16)
    max_waiting: int = Field(256, ge=0)
    timeout_s: float = Field(600.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    replicas: int = Field(1, ge=1, le=64)
    placement: bool = True
    compile: bool = True                   # compiled decode steps (shards/model/compiled.py)
    compiled_graph: bool = False           # steps through a Ray Compiled Graph (serving/control/pipeline.py)
    channels: bool = True                  # steps over a socket per shard (shards/runtime/channel.py)
    prefix_cache: bool = True              # prompts start after a cached block prefix (serving/router/prefix.py)
    prefix: str = Field("", pattern=r"^[a-z0-9-]*$")
    control: bool = True
    controller: ControllerArgs | None = None
    api_key: str | None = None             # prefer api_key_env: a key in a file gets copied around
    api_key_env: str = "SHARDSERVE_API_KEY"

    @field_validator("compression")
    @classmethod
    def _compression(cls, v):
        if v is not None:
            from shards.compress.spec import parse
            parse(v)
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v):
        return None if v is None else [_bytes(b) for b in v]

    def engine(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, shards=0 if self.shards == "auto" else self.shards, budgets=self.budgets,
            kv_tokens=self.kv_tokens, block_size=self.block_size, max_batch=self.max_batch,
            prefill_tokens=self.prefill_tokens, compression=self.compression, device=self.device,
            prefix=self.prefix, max_waiting=self.max_waiting, timeout_s=self.timeout_s, control=self.control,
            controller=self.controller.settings() if self.controller else None, replicas=self.replicas,
            placement=self.placement, compile=self.compile, compiled_graph=self.compiled_graph,
            channels=self.channels, prefix_cache=self.prefix_cache)

    def key(self) -> str | None:
        return self.api_key or os.environ.get(self.api_key_env) or None


def app_config(args: dict) -> AppConfig:
    """args validated, or a ShardServeError naming each bad field and what it accepts."""
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'args'}: {x['msg']}"
                             + (f" (got {x['input']!r})" if x["type"] != "missing" else "")
                             for x in e.errors())
        fields = ", ".join(AppConfig.model_fields)
        raise ShardServeError(f"invalid shardserve app args: {problems}. Fields: {fields}") from None
