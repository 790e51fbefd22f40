"""Per-step decode time of one stage and where it goes (torch.profiler), as a shard runs it:

    .venv/bin/python bench/profile_stage.py --compression w8a16 --layers 0 19 --batch 1 8 32 --profile 32

Builds layers [start, end) (+ embedding / lm_head at the ends), prefills 100 tokens for each of
`batch` sequences, then times 10 decode steps at 1 thread (a shard's share of this 2-core node).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from shards.model.source import open_source
    from shards.model.stage import Stage
    from shards.model.step import StepBatch
    from shards.plan.layer_range import LayerRange
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--compression", default="fp32")
    ap.add_argument("--layers", type=int, nargs=2, default=[0, 19])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="profile decode at this batch size")
    ap.add_argument("--compile", action="store_true", help="the compiled decode step, as served")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    st = Stage(open_source(a.model), LayerRange(*a.layers), kv_blocks=32 * 10, compression=a.compression,
               compile=a.compile, threads=(a.threads,))

    def inputs(b: int, q: int) -> dict:
        if st.is_first:
            return {"tokens": torch.randint(100, 900, (b, q))}
        return {"hidden": torch.randn(b, q, st.config.hidden_size), "layer": a.layers[0]}

    def decode(b: int, steps: int = 10, prof=None) -> float:
        sids = list(range(b))
        st(StepBatch(sids, [0] * b, [100] * b, **inputs(b, 100)))
        t = time.perf_counter()
        if prof:
            prof.start()
        for s in range(steps):
            st(StepBatch(sids, [100 + s] * b, [1] * b, **inputs(b, 1)))
        if prof:
            prof.stop()
        dt = (time.perf_counter() - t) / steps
        for i in sids:
            st.free(i)
        return dt
    for b in a.batch:
        print(f"{a.compression} layers {LayerRange(*a.layers)} batch {b}: {1000 * decode(b):.1f} ms per decode step", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        p = profile(activities=[ProfilerActivity.CPU])
        decode(a.profile, prof=p)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
