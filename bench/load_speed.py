"""What bounds loading: the same decoder layers read, converted and quantized, each part timed.

    .venv/bin/python bench/load_speed.py --model DIR --layers 4 \
        --compression fp32 bf16 w8a16 fast nf4 --json bench/results/load-speed-NAME.json

For each spec, layers [1, 1 + layers) are loaded three ways, in one process with the same torch
threads as a shard: (1) every tensor read from the source as stored (safetensors: a copy out of
the page cache or the disk); (2) built as fp32 blocks (read, converted to fp32, fused); (3) built
at the spec (2, then quantized). The first pass of each spec may read from the disk; `--cold`
drops the page cache before it (root only). GiB are of the source tensors.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from serving.stamp import stamp


def _drop_page_cache() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_spec(model: str, spec: str, layers: range, cold: bool) -> dict:
    from shards.compress.apply import build_block, remaining
    from shards.model.block import fp32_block
    from shards.model.source import has_qkv_bias, layer_tensor_names, open_source
    source = open_source(model)
    names = [n for i in layers for n in layer_tensor_names(i, has_qkv_bias(source.config))]
    nbytes = sum(source.tensor(n).nbytes for n in names[:len(names) // len(layers)]) * len(layers)
    dropped = _drop_page_cache() if cold else False
    read_cold = timed(lambda: [source.tensor(n).clone() for n in names]) if dropped else None
    read = timed(lambda: [source.tensor(n).clone() for n in names])   # clone: every page touched
    fp32 = timed(lambda: [fp32_block(source, i) for i in layers])
    _, todo = remaining(source, spec)
    built = timed(lambda: [build_block(source, i, todo) for i in layers])
    gib = nbytes / 2**30
    return {"compression": spec, "layers": len(layers), "source_gib": round(gib, 3),
            "read_cold_s": None if read_cold is None else round(read_cold, 2), "read_s": round(read, 2),
            "fp32_s": round(fp32, 2), "built_s": round(built, 2),
            "read_gib_s": round(gib / read, 2), "read_cold_gib_s": None if read_cold is None else round(gib / read_cold, 2),
            "built_gib_s": round(gib / built, 2), "quantize_share": round(max(0.0, built - fp32) / built, 2),
            "convert_share": round(max(0.0, fp32 - read) / built, 2), "read_share": round(read / built, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--compression", nargs="+", default=["fp32", "bf16", "w8a16", "fast", "nf4"])
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each spec's first read")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from serving.launch import serving_compression
    from shards.compress.spec import parse
    from shards.model.source import open_source
    rows = []
    for comp in a.compression:
        spec = parse(serving_compression(comp, open_source(a.model))).spec
        rows.append({**one_spec(a.model, spec, range(1, 1 + a.layers), a.cold), "asked": comp})
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"meta": stamp(), "model": a.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
