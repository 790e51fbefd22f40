"""What a shard actor reports about itself (`ShardActor.stats`): one typed record, read by the
controller's policy, the pipeline, the HTTP API (`/v1/shards`, as `to_dict()`), the CLI and the
benches. Bytes are bytes, times are seconds or milliseconds as named."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ShardStats:
    start: int                       # the layers it holds: [start, end)
    end: int
    device: str
    compression: str                 # the spec it serves
    pid: int
    node: str | None                 # Ray node id and address
    node_id: str | None
    rss_bytes: int                   # resident bytes less shared-memory pages (Ray's object store)
    peak_rss_bytes: int
    base_rss_bytes: int              # before any weight loaded: the runtime (Python, torch, Ray)
    weight_bytes: int                # parameters, buffers and quantization side tensors
    kv_blocks_used: int              # KV held for requests
    kv_bytes_used: int
    live_sequences: int
    prefix_holders: int              # prefix-cache holders pinned here, and their blocks
    prefix_blocks: int
    kv_bytes_reserved: int           # the whole KV pool
    budget_bytes: int | None         # what it may hold (the controller compares use with it)
    steps: int                       # forward calls served
    layer_bytes: int                 # mean bytes of one decoder layer with its KV pool
    node_available_bytes: int
    step_ms_mean: float
    compiled: bool                   # decode steps are compiled (fused, or the graph)
    fused: bool                      # decode steps run as one C++ call (shards/model/fused.py)
    attention_kernel: bool           # decode attention runs the paged C++ kernel
    compile_s: float                 # seconds spent compiling or loading graphs
    graphs: int
    compiled_steps: int              # decode steps through the graph
    fused_steps: int                 # decode steps through the fused call
    load_s: float = 0.0              # seconds its first load took, compile_s of them compiling
    busy: tuple[tuple[float, float], ...] = field(default=(), repr=False)   # recent steps (start, end), epoch s

    @property
    def used_bytes(self) -> int:
        """What its tensors and workspace hold: RSS less the runtime."""
        return self.rss_bytes - self.base_rss_bytes

    def to_dict(self, busy: bool = False) -> dict:
        out = asdict(self)
        if not busy:
            del out["busy"]
        return out
