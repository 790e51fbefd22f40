"""Tier 1: building our C++ kernels (shards/runtime/kernels.py): one build per library however
many shard processes ask for it at once, then the cached library."""
import threading

import pytest

from shards.runtime import kernels

pytestmark = pytest.mark.unit


def test_concurrent_builds_compile_once(tmp_path, monkeypatch):
    source = tmp_path / "add.cpp"
    source.write_text('extern "C" int add(int a, int b) { return a + b; }\n')
    runs = tmp_path / "runs"
    cxx = tmp_path / "cxx"    # the real compiler, counting its runs
    cxx.write_text(f'#!/bin/sh\necho run >> {runs}\nsleep 1\nexec g++ "$@"\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("SHARDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    built = []
    threads = [threading.Thread(target=lambda: built.append(kernels.build(source))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs.read_text().count("run") == 1
    assert len(set(built)) == 1 and built[0].is_file()
    assert kernels.load(source).add(2, 3) == 5
    assert runs.read_text().count("run") == 1          # found in the cache, not built again
