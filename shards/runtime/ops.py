"""The CPU kernels of our torch ops (`shardserve::qmatmul`, `shardserve::paged_decode_attention`)
in C++ (shards/runtime/ops.cpp, on torch's stable C ABI): the compiled decode graph's call goes
through the dispatcher straight to our kernels, with no Python in between.

The ops' schemas are defined where their kernels live (shards/compress/qmatmul.py,
shards/model/attention.py); each calls `register` once its own kernel library is loaded. The
glue library is built like our kernels (shards/runtime/kernels.py), against this torch's headers
and libraries (~1.3 s, once; keyed by the torch version too). Where it cannot be built, each op
gets its Python kernel instead (the same kernels through ctypes, ~3.5 us more a call), as with
SHARDSERVE_TORCH_OPS=0 (A/B runs).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

from shards.runtime import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ops.cpp")


def torch_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiler flags, linker arguments) for this torch."""
    base = Path(torch.__file__).parent
    return ((f"-I{base / 'include'}", f"-DSHARDSERVE_TORCH_VERSION={torch.__version__}"),
            (f"-L{base / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{base / 'lib'}"))


@functools.cache
def _glue() -> ctypes.CDLL | None:
    """The glue library, loaded (which registers its C++ kernels for both ops), or None."""
    if os.environ.get("SHARDSERVE_TORCH_OPS", "1") == "0":   # A/B runs: the Python kernels
        return None
    try:
        lib = kernels.load(SOURCE, *torch_flags())
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("torch op glue unavailable, our ops run through Python kernels: %s", e)
        return None
    lib.shardserve_bind.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.shardserve_bind.restype = ctypes.c_int
    return lib


def register(lib: torch.library.Library, op: str, kernel: ctypes._CFuncPtr, python_kernel) -> None:
    """Give `shardserve::<op>` its CPU kernel: the glue's, calling `kernel` (the C function in our
    loaded library), or else `python_kernel` on `lib`. Call once per op, after loading `kernel`."""
    glue = _glue()
    if glue is None:
        lib.impl(op, python_kernel, "CPU")
    elif glue.shardserve_bind(op.encode(), ctypes.cast(kernel, ctypes.c_void_p)):
        raise ValueError(f"shards/runtime/ops.cpp has no kernel for an op named {op!r}")


def native() -> bool:
    """Whether the ops' CPU kernels are the glue's (C++), not Python."""
    return _glue() is not None
