"""The one typed configuration of a shardserve application.

`Config` has a section per concern (model, cache, scheduler, controller, transport, server).
deploy/serve.yaml's `args`, `build_app`, the engine and the CLI all read it: the CLI's flags are
made from its fields (name, help text, default; `cli_flags`), and every field may also be given
by its flat name (`shards: 2`, as `serve run serving.api.app:build_app shards=2` passes it).
Sizes accept "400MiB". A bad field is refused with its name and what it accepts.

Pure: pydantic only (no torch, no Ray), so the controller's policy takes its section directly.
"""
from __future__ import annotations

import argparse
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.units import parse_bytes
from shards.errors import ShardServeError

MiB = 1 << 20


def _bytes(v: Any) -> Any:
    """300MiB -> bytes; pydantic reports a ValueError with the field's name."""
    if isinstance(v, str):
        try:
            return parse_bytes(v)
        except ShardServeError as e:
            raise ValueError(str(e)) from None
    return v


ByteSize = Annotated[int, BeforeValidator(_bytes)]


def _spec(v: str | None) -> str | None:
    if v is not None:
        from shards.compress.spec import parse
        parse(v)    # refuses with the list of valid specs
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    name: str = Field("default", description="'default' (SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face "
                                             "folder or prepared artifact", json_schema_extra={"flat": "model"})
    served_name: str | None = Field(None, description="the model id /v1/models shows (default shardserve-<model>)")
    shards: int | Literal["auto"] = Field(2, description="layer ranges per pipeline; auto: one per Ray node")
    compression: Annotated[str | None, BeforeValidator(_spec)] = Field(
        None, description="compression spec for every shard, e.g. w4a8x2, w8a16, nf4+wanda:0.5, balanced "
                          "(default: fast = w4a8x2; a prepared artifact: what it was made with; eval, generate "
                          "and prepare: the file's own weights)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA where a node has a GPU, else CPU")
    compile: bool = Field(True, description="compiled decode step (compiled at load, cached on disk); false: eager")


class CacheSection(Section):
    kv_tokens: int = Field(8192, ge=16, description="KV tokens each shard reserves (without budgets)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    budgets: list[ByteSize] | None = Field(None, description="memory per shard, e.g. [300MiB, 300MiB]; the plan "
                                                             "fits layers and KV into them")
    prefix_cache: bool = Field(True, description="a prompt starts after the tokens it shares with an earlier prompt, their K/V copied")


class SchedulerSection(Section):
    max_batch: int = Field(32, ge=1, le=1024, description="sequences per micro-batch group")
    prefill_tokens: int = Field(256, ge=16, description="prompt tokens one prefill chunk takes")
    max_waiting: int = Field(256, ge=0, description="requests queued beyond the running ones; more get 429")
    timeout_s: float = Field(600.0, gt=0, description="a request running longer is aborted (504), its KV freed")


class ControllerConfig(Section):
    """The controller's settings; its policy (serving/control/policy.py) reads them as they are."""

    enabled: bool = Field(True, description="run the controller (re-sharding under memory pressure)",
                          json_schema_extra={"flat": "control"})
    high_watermark: float = Field(0.95, gt=0, le=1, description="use / budget above this is pressure")
    low_watermark: float = Field(0.85, gt=0, le=1, description="an action aims to bring the shard under this")
    readings: int = Field(3, ge=1, description="consecutive readings under pressure before acting")
    quiet_s: float = Field(20.0, ge=0, description="no action for this long after one")
    relax_s: float = Field(300.0, ge=0, description="no pressure for this long: lower a raised compression a step")
    min_node_free_bytes: ByteSize = Field(512 * MiB, ge=0, description="a node with less free memory is pressure")
    actions: tuple[Literal["move", "split", "recompress"], ...] = Field(
        ("move", "split", "recompress"), description="allowed actions, in order of preference")
    ladder: tuple[str, ...] = Field((), description="compression steps, lightest first (default: the registry's, "
                                                    "ordered by bytes measured on the served model)")
    ladder_bytes: tuple[float, ...] = Field((), description="a layer's bytes at each ladder step / the first's "
                                                            "(default: measured)")
    max_shards: int = Field(8, ge=1, description="a split never makes more shards than this")

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, v):
        for spec in v:
            _spec(spec)
        return v

    @model_validator(mode="after")
    def _whole(self):
        if not self.low_watermark < self.high_watermark:
            raise ValueError(f"watermarks need 0 < low ({self.low_watermark}) < high ({self.high_watermark})")
        if self.ladder_bytes and len(self.ladder) != len(self.ladder_bytes):
            raise ValueError(f"ladder {self.ladder} and ladder_bytes {self.ladder_bytes} differ in length")
        return self


class TransportSection(Section):
    channels: bool = Field(True, description="steps over a socket per shard; false: Ray actor calls")
    compiled_graph: bool = Field(False, description="steps through a Ray Compiled Graph (one router per pipeline)")


class ServerSection(Section):
    replicas: int = Field(1, ge=1, le=64, description="data-parallel pipelines, one Serve replica routing each")
    placement: bool = Field(True, description="pin shards to nodes, layers in proportion to node memory")
    prefix: str = Field("", pattern=r"^[a-z0-9-]*$", description="actor names are <prefix>shard-<k>")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' (prefer api_key_env)")
    api_key_env: str = Field("SHARDSERVE_API_KEY", description="the environment variable holding the API key")
    admin_key: str | None = Field(None, description="a separate key for /v1/shards and its changes (prefer "
                                                    "admin_key_env; unset: the API key)")
    admin_key_env: str = Field("SHARDSERVE_ADMIN_KEY", description="the environment variable holding the admin key")
    insecure: bool = Field(False, description="serve on a non-loopback host without an API key")
    direct_ingress: bool = Field(True, description="one replica on a Ray the CLI starts takes HTTP on its own "
                                                   "server; false: through Serve's proxy")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection, "cache": CacheSection, "scheduler": SchedulerSection, "controller": ControllerConfig,
    "transport": TransportSection, "server": ServerSection}


def _flat_names() -> dict[str, tuple[str, str]]:
    """flat name -> (section, field); flat names are unique across sections."""
    out = {}
    for section, cls in SECTIONS.items():
        for name, f in cls.model_fields.items():
            flat = (f.json_schema_extra or {}).get("flat", name)
            assert flat not in out, f"flat name {flat} twice"
            out[flat] = (section, name)
    return out


FLAT = _flat_names()


class Config(BaseModel):
    """What one shardserve application serves and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelSection = ModelSection()
    cache: CacheSection = CacheSection()
    scheduler: SchedulerSection = SchedulerSection()
    controller: ControllerConfig = ControllerConfig()
    transport: TransportSection = TransportSection()
    server: ServerSection = ServerSection()

    @model_validator(mode="before")
    @classmethod
    def _nest_flat(cls, data: Any) -> Any:
        """Flat names (`shards: 2`, `kv_tokens: 4096`) go into their sections, over what the
        sections say whatever the keys' order (YAML dumps sort them); `model` as a string is
        the model's name."""
        if not isinstance(data, dict):
            return data
        data = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in data.items()}
        sections = {k: dict(v) for k, v in data.items() if k in SECTIONS and isinstance(v, dict)}
        out: dict = {**{k: v for k, v in data.items() if k not in sections and k not in FLAT}, **sections}
        for key, value in data.items():      # refused by extra="forbid" (above), with its name
            if key in FLAT and key not in sections:
                section, name = FLAT[key]
                out.setdefault(section, {})[name] = value
        return out

    def key(self) -> str | None:
        return self.server.api_key or os.environ.get(self.server.api_key_env) or None

    def admin_key(self) -> str | None:
        return self.server.admin_key or os.environ.get(self.server.admin_key_env) or None

    def fingerprint(self) -> str:
        """8 hex digits of what a pipeline's shard actors hold (model, shard count, compression,
        cache, placement). Actor names carry it, so a redeploy that changes any of these starts
        new shards instead of attaching to the running ones by name."""
        import hashlib
        import json
        held = {"model": self.model.model_dump(exclude={"served_name"}),
                "cache": self.cache.model_dump(exclude={"prefix_cache"}), "placement": self.server.placement}
        return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()[:8]

    def check_bind(self, host: str) -> None:
        """Refuse to serve a host beyond this machine with no API key, unless `insecure`."""
        if not self.key() and not self.server.insecure and not loopback(host):
            raise ShardServeError(f"refusing to serve on {host} without an API key: anyone who reaches it could "
                                  f"use the model; set the API key (--api-key or ${self.server.api_key_env}), or "
                                  "insecure (--insecure)")

    def replace(self, **flat) -> "Config":
        """A copy with fields changed by their flat names."""
        return load(self, **flat)


def loopback(host: str) -> bool:
    """Whether `host` is this machine only: a loopback address or `localhost` (any other name
    may resolve beyond it)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _merge(nested: dict, flat: dict) -> dict:
    out = {k: dict(v) for k, v in nested.items()}
    for key, value in flat.items():
        if key in SECTIONS and isinstance(value, dict):     # a section's fields: controller={...}
            out[key].update(value)
        elif key in FLAT:
            section, name = FLAT[key]
            out[section][name] = value
        else:
            raise ShardServeError(f"unknown config field {key!r}; sections: {', '.join(SECTIONS)}; "
                                  f"fields: {', '.join(FLAT)}")
    return out


def load(args: dict | Config | None = None, **flat) -> Config:
    """args (nested sections and / or flat names) validated, or a ShardServeError naming each
    bad field and what it accepts."""
    if isinstance(args, Config):
        args = args.model_dump()
    try:
        cfg = Config.model_validate(args or {})
        return Config.model_validate(_merge(cfg.model_dump(), flat)) if flat else cfg
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'args'}: {x['msg']}"
                             + (f" (got {x['input']!r})" if x["type"] != "missing" else "")
                             for x in e.errors())
        raise ShardServeError(f"invalid shardserve config: {problems}. Sections: {', '.join(SECTIONS)}; "
                              f"fields: {', '.join(FLAT)}") from None


# ---- the command line: flags made from the fields ------------------------------------------------
def cli_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """A flag per field (`--kv-tokens`, `--compile/--no-compile`), help and default from the
    field; flags not given leave the config's default. only: these flat names."""
    for flat, (section, name) in FLAT.items():
        if only is not None and flat not in only:
            continue
        f = SECTIONS[section].model_fields[name]
        flag = "--" + flat.replace("_", "-")
        help_ = f.description if "default" in f.description else f"{f.description} (default: {_shown(f.default)})"
        kw: dict = {"dest": flat, "default": argparse.SUPPRESS, "help": help_}
        if f.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif str(f.annotation).startswith(("tuple", "list", "typing.Tuple", "typing.List")) or flat == "budgets":
            parser.add_argument(flag, type=lambda s: [x for x in s.split(",") if x], metavar="A,B,...", **kw)
        else:
            parser.add_argument(flag, **kw)


def _shown(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return "none" if v is None else str(v)


def from_args(args: argparse.Namespace, base: dict | None = None) -> Config:
    """The config of `base` with the flags given on the command line (by flat name)."""
    given = {k: v for k, v in vars(args).items() if k in FLAT}
    return load(base or {}, **given)
