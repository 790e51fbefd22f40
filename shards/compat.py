"""Every private API of torch, transformers, bitsandbytes and Ray shardserve uses, in one place.

Each accessor checks that the library is at least the version the code was written against
and that the name still exists; when either fails it raises an error that names the library,
the version installed, the version needed and what uses it, instead of an AttributeError deep
in a load. Call sites import from here, never the private name itself; kernels that run inside
compiled graphs read the op once at import (a module constant), so tracing sees a plain op.
"""
from __future__ import annotations

import functools
import importlib
from importlib.metadata import PackageNotFoundError, version

from shards.errors import ShardServeError

# the lowest versions tested with every name below (pyproject.toml's bounds)
NEEDS = {"torch": (2, 11), "transformers": (5, 25), "bitsandbytes": (0, 50), "ray": (2, 60)}


class CompatError(ShardServeError, ImportError):
    pass


def _version(lib: str) -> tuple[int, ...]:
    try:
        text = version(lib)
    except PackageNotFoundError:
        raise CompatError(f"{lib} is not installed; shardserve needs {lib} >= {_dotted(NEEDS[lib])}") from None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def _dotted(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


@functools.cache
def require(lib: str) -> None:
    """Raise CompatError unless `lib` is at least NEEDS[lib]."""
    have = _version(lib)
    if have < NEEDS[lib]:
        raise CompatError(f"{lib} {version(lib)} is installed; shardserve needs {lib} >= {_dotted(NEEDS[lib])} "
                          f"(see pyproject.toml)")


@functools.cache
def private(lib: str, path: str, used_for: str):
    """The object at dotted `path` (e.g. 'torch.ops.aten._weight_int4pack_mm_for_cpu'), after the
    version check; a missing name is an error that says what needs it."""
    require(lib)
    mod_name, obj = path, None
    parts = path.split(".")
    for i in range(len(parts), 0, -1):     # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            mod_name = ".".join(parts[:i])
            break
        except ImportError:
            continue
    try:
        for attr in parts[len(mod_name.split(".")):]:
            obj = getattr(obj, attr)
    except AttributeError:
        raise CompatError(f"{lib} {version(lib)} has no {path}, which {used_for} needs; shardserve is tested "
                          f"with the versions in README.md, \"Requirements\"") from None
    return obj


# torch: CPU kernels without a public API
def int8pack_mm():
    return private("torch", "torch._weight_int8pack_mm", "w8a16's decode matmul")


def int_mm():
    return private("torch", "torch._int_mm", "w8a8's int8 GEMM")


def int4pack_convert():
    return private("torch", "torch.ops.aten._convert_weight_to_int4pack_for_cpu", "w4a16's weight packing")


def int4pack_mm():
    return private("torch", "torch.ops.aten._weight_int4pack_mm_for_cpu", "w4a16's matmul")


# torch: the compiler's knobs and counters
def dynamo_config():
    return private("torch", "torch._dynamo.config", "the compiled decode step's recompile limit")


def inductor_config():
    return private("torch", "torch._inductor.config", "the compiled decode step's kernel asserts")


def dynamo_counters():
    return private("torch", "torch._dynamo.utils.counters", "counting compiled graphs")


def set_stance():
    return private("torch", "torch.compiler.set_stance", "decode steps that must not recompile")


def dynamo_cache_entries():
    """code -> dynamo's cache entries for it (each with .code, the transformed bytecode that
    calls its graph, and .guard_manager)."""
    return private("torch", "torch._dynamo.eval_frame._debug_get_cache_entry_list",
                   "the decode step's direct graph calls")


# transformers: the GGUF reader's internals and Llama's RoPE
def gguf_tensor_processors():
    """(TENSOR_PROCESSORS, TensorProcessor): per-architecture GGUF tensor fixes (Q/K permutes)."""
    return (private("transformers", "transformers.modeling_gguf_pytorch_utils.TENSOR_PROCESSORS", "GGUF loading"),
            private("transformers", "transformers.modeling_gguf_pytorch_utils.TensorProcessor", "GGUF loading"))


def gguf_read_field():
    return private("transformers", "transformers.modeling_gguf_pytorch_utils.read_field", "GGUF metadata")


def llama_rotary_embedding():
    return private("transformers", "transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
                   "RoPE frequencies as transformers computes them")


def serve_client():
    """The running Serve controller's client (None when this process is not connected to Ray,
    or Serve is not started): its HTTP options say which host the app is served on."""
    import ray
    if not ray.is_initialized():
        return None
    return private("ray", "ray.serve.context._get_global_client", "build_app's bind check")(
        raise_if_no_controller_running=False)


def ray_bootstrap_address(address: str | None) -> str | None:
    """Where `ray.init(address)` connects: None when it starts a Ray of its own (with no address
    it joins one `ray start` left on this machine)."""
    return private("ray", "ray._private.services.canonicalize_bootstrap_address",
                   "deciding whether `shardserve serve` starts Ray")(address)


def reusable_direct_ingress() -> None:
    """Start a Serve replica's direct-ingress HTTP server with SO_REUSEADDR and SO_REUSEPORT, as
    Serve's proxy starts its own. Without them, every connection the replica served and closed
    holds the port in TIME_WAIT for 60 s, and neither a restarted replica nor the next server on
    that port can bind it meanwhile. Call in the replica before Serve starts that server (the
    deployment's constructor runs first)."""
    private("ray", "ray.serve._private.replica.start_asgi_http_server", "direct ingress on a reusable port")
    replica = private("ray", "ray.serve._private.replica", "direct ingress on a reusable port")
    start = replica.start_asgi_http_server   # the current one: a second call finds its own wrapper
    if getattr(start, "reusable", False):
        return

    async def start_reusable(app, http_options, *, event_loop, enable_so_reuseport=False):
        return await start(app, http_options, event_loop=event_loop, enable_so_reuseport=True)
    start_reusable.reusable = True
    replica.start_asgi_http_server = start_reusable
