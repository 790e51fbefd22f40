"""Our C++ kernels (shards/*.cpp): built with the node's C++ compiler at first use, cached, loaded
with ctypes. Used by shards/model/attention.py (paged decode attention), shards/compress/qmatmul.py
(w4a8x2's 4-bit matmul) and shards/runtime/ops.py (the torch ops' C++ kernels).

Built with -march=native for the node's CPU: the cached library is keyed by source, compiler,
flags and the CPU's flags, so a cache shared between nodes of different CPUs keeps one build per
kind. ~4 s a kernel here, once; then loading takes milliseconds.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def cache_dir() -> Path:
    """Beside inductor's cache (shards/__init__.py): built kernels persist across restarts."""
    base = os.environ.get("SHARDSERVE_KERNEL_CACHE")
    return Path(base) if base else Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent / "kernels"


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def build(source: Path, extra: tuple[str, ...] = (), libs: tuple[str, ...] = ()) -> Path:
    """The shared library of `source` (built now unless cached); raises OSError when the
    compiler fails or is missing, subprocess.TimeoutExpired past 300 s. libs: linker arguments,
    which go after the source (a linker drops a library named before any object needs it)."""
    cxx = os.environ.get("CXX", "g++")
    flags = FLAGS + tuple(extra)
    key = hashlib.sha256(source.read_bytes() + " ".join((cxx,) + flags + tuple(libs)).encode() + _cpu_key().encode())
    out = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time per library: shard actors of one node that start at once would each
    # spend a core on the same build (~4 s); the one that waits finds it built
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            _compile(cxx, flags, source, out, tuple(libs))
    return out


def _compile(cxx: str, flags: tuple[str, ...], source: Path, out: Path, libs: tuple[str, ...]) -> None:
    """Build beside the final name and rename: a reader (or a node whose file system ignores
    the lock) never loads half a library."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(source), "-o", tmp, *libs], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise OSError(f"{cxx} failed ({r.returncode}): {r.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, extra: tuple[str, ...] = (), libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find) and load; linked against libgomp.so.1, so the copy torch loaded serves it
    too (one OpenMP runtime in the process)."""
    return ctypes.CDLL(str(build(source, extra, libs)))
