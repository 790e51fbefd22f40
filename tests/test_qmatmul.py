"""Tier 1: w4a8x2's kernel (shards/compress/qmatmul.cpp) against its formula, row by row whatever the
batch, the portable path bit for bit; a Q4_1 / Q8_0 source's own weights kept exactly; the real
model's w4a8x2 stages against fp32."""
import ctypes
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from shards.compress import qmatmul
from shards.compress.int4 import GROUP, codes_on, rtn_grid
from shards.compress.qmatmul import SOURCE, Q8Linear, W4A8CpuLinear, pack
from shards.runtime import kernels

pytestmark = pytest.mark.model

LEVEL_ERR = {1: 5e-2, 2: 2e-4}   # relative error against x @ W^T of its weights, an input channel 50x loud


def formula(x: torch.Tensor, w_codes: torch.Tensor, d, m, levels: int) -> torch.Tensor:
    """The kernel's definition in float64: x rounded per group of 32 to `levels` int8 levels
    (round half to even on max|.| / 127), exact integer dots, then d a dot + m sum(x)."""
    g = x.reshape(x.shape[0], -1, GROUP)
    total = (g.double().sum(-1) @ m.double().t())                    # [B, N]: the minimum's term
    u = w_codes.double().reshape(w_codes.shape[0], -1, GROUP)
    r = g.clone()
    for _ in range(levels):
        amax = r.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
        q = torch.round(r * inv).clamp(-127, 127)
        a = amax / 127
        dot = torch.einsum("bgk,ngk->bng", q.double(), u)
        total += (dot * d.double()[None] * a.double().squeeze(-1)[:, None, :]).sum(-1)
        r = r - q * a
    return total.float()


def grid4(n: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) / 8
    d, m = rtn_grid(w)
    d, m = d.half().float(), m.half().float()
    return w, codes_on(w, d, m), d, m


def q4_0_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF's Q4_0 grid for w: symmetric groups, w = d (u - 8), d from each group's absmax."""
    d = (w.reshape(w.shape[0], -1, GROUP).abs().amax(-1) / 8).half().float()
    return d, -8 * d


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_groups_store_d_alone_and_give_the_same_bits(levels, bits):
    """Groups whose minimum is -2^(bits - 1) d (a Q4_0 or Q8_0 source; every 8-bit table) keep d
    alone, 18 bytes a group of 32 instead of 20 (4-bit) and 34 instead of 36 (8-bit); the kernel
    makes m from d, so every row gets the bits of the same weights stored with their m, at 1, 8
    and 19 rows (whole and part tiles) and 1 and 2 threads."""
    torch.manual_seed(5)
    w = torch.randn(64, 160) / 8
    if bits == 4:
        d, m = q4_0_grid(w)
        sym = W4A8CpuLinear(w, grid=(d, m), levels=levels)
        stored = W4A8CpuLinear(w, grid=(d, m), levels=levels)
        stored.scales = pack(sym.codes(), d, m, 4)[1]
    else:
        sym = Q8Linear.from_rows(lambda a, b: w[a:b], 64, levels=levels)
        d = sym.scales.float().permute(0, 2, 1).reshape(64, -1)
        stored = Q8Linear(*pack(sym.codes(), d, -128 * d, 8), 160, levels=levels)
    assert sym.symmetric and not stored.symmetric
    assert torch.equal(sym.packed, stored.packed) and torch.equal(sym.dequantized(), stored.dequantized())
    per_group = (sym.packed.numel() + 2 * sym.scales.numel()) / (64 * 160 / GROUP)
    assert per_group == {4: 18, 8: 34}[bits]
    x = torch.randn(19, 160)
    x[:, 3] *= 50
    was = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b in (1, 8, 19):
                assert torch.equal(sym(x[:b]), stored(x[:b])), (threads, b)
    finally:
        torch.set_num_threads(was)


def test_an_asymmetric_grid_keeps_its_minimum():
    w, q, d, m = grid4(32, 64)
    lin = W4A8CpuLinear(w)
    assert not lin.symmetric and torch.equal(lin.dequantized(), (q.reshape(32, -1, GROUP) * d[..., None] + m[..., None]).reshape(32, 64))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n, k", [(48, 64), (32, 160)])
def test_4bit_kernel_computes_its_formula(levels, n, k):
    w, q, d, m = grid4(n, k)
    lin = W4A8CpuLinear(w, levels=levels)
    assert torch.equal(lin.codes(), q)
    x = torch.randn(11, k)
    x[:, 5] *= 50                                      # an outlier channel
    got, want = lin(x), formula(x, q, d, m, levels)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    exact = x @ lin.dequantized().t()
    assert (got - exact).norm() / exact.norm() < LEVEL_ERR[levels]


@pytest.mark.parametrize("levels", [1, 2])
def test_8bit_table_computes_its_formula_and_reads_rows(levels):
    torch.manual_seed(1)
    w = torch.randn(64, 96)
    t = Q8Linear.from_rows(lambda a, b: w[a:b], 64, chunk=32)
    t.levels = levels
    g = w.view(64, -1, GROUP)
    d = (g.abs().amax(-1) / 127).half().float()
    q = torch.round(g / d[..., None]).clamp(-127, 127).view(64, 96)
    assert torch.equal(t.codes(), (q + 128).int())
    deq = (q.view(64, -1, GROUP) * d[..., None]).view(64, 96)
    assert torch.equal(t.dequantized(), deq)
    ids = torch.tensor([[3, 17, 63], [0, 16, 3]])
    assert torch.equal(t.rows(ids), deq[ids])
    with pytest.raises(IndexError, match=r"in \[0, 64\), got 3 .. 64"):
        t.rows(torch.tensor([3, 64]))
    # groups that store their minimum beside the scale ([panels, groups, 2, 16]) read the same way
    m = (torch.rand(t.scales.shape) - 0.5).half()
    asym = Q8Linear(t.packed, torch.stack([t.scales, m], 2), 96)
    assert not asym.symmetric and torch.equal(asym.rows(ids), asym.dequantized()[ids])
    x = torch.randn(9, 96)
    got = t(x)
    assert (got - formula(x, q + 128, d, -128 * d, levels)).abs().max() <= 1e-5 * got.abs().max()


@pytest.mark.parametrize("levels", [1, 2])
def test_a_rows_result_does_not_depend_on_its_batch(levels):
    """Tiles of activation rows (8, or 4 on AVX2; half at two levels) share each weight vector: every batch size
    up to 19 gives each row the bits it gets alone, 4-bit and 8-bit, 1 and 2 threads."""
    w, *_ = grid4(64, 96, seed=2)
    mods = [W4A8CpuLinear(w, levels=levels), Q8Linear.from_rows(lambda a, b: w[a:b], 64)]
    mods[1].levels = levels
    x = torch.randn(19, 96)
    was = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mod in mods:
                alone = torch.cat([mod(x[i:i + 1]) for i in range(19)])
                for b in (2, 5, 8, 9, 16, 19):
                    assert torch.equal(mod(x[:b]), alone[:b]), (type(mod).__name__, threads, b)
    finally:
        torch.set_num_threads(was)


@pytest.mark.parametrize("team", [2, 3])
def test_the_team_gives_each_row_its_bits(team):
    """Inside qmatmul.team(n) a step's panels are split over n threads: the same bits as one
    thread, for panel counts below, at and above n, 4-bit and 8-bit, below and at AMX's rows
    (19 x 2 levels), step after step; and the helpers do compute (their thread time grows)."""
    w, *_ = grid4(160, 96, seed=3)
    mods = [W4A8CpuLinear(w, levels=2), W4A8CpuLinear(w[:16], levels=2),
            Q8Linear.from_rows(lambda a, b: w[a:b], 160)]
    x = torch.randn(19, 96)
    batches = (1, 3, 19)
    alone = [[mod(x[:b]) for b in batches] for mod in mods]
    big = W4A8CpuLinear(torch.randn(4096, 1024) / 8)
    xb = torch.randn(1, 1024)
    before = _thread_cpu()
    with qmatmul.team(team):
        for _ in range(3):
            for mod, want in zip(mods, alone):
                for b, y in zip(batches, want):
                    assert torch.equal(mod(x[:b]), y), (team, type(mod).__name__, b)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:       # seconds: well above the clock's 10 ms ticks
            big(xb)
    helpers = {t: s - before.get(t, 0.0) for t, s in _thread_cpu().items() if t != threading.get_native_id()}
    assert max(helpers.values(), default=0.0) > 0.1, helpers
    assert torch.equal(mods[0](x[:3]), alone[0][1])      # off again: the calling thread alone


def test_the_team_never_waits_for_a_helper_that_is_not_running():
    """A helper whose core another thread holds leaves its share to the caller: with every
    thread of this process on one core (the helper runs only when the caller is preempted), a
    call inside qmatmul.team(2) takes about what it takes alone, and gives the same bits."""
    big = W4A8CpuLinear(torch.randn(4096, 1024) / 8)
    xb = torch.randn(1, 1024)
    want = big(xb)

    def call_ms(n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            big(xb)
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[n // 2]

    with qmatmul.team(2):       # starts the helper, so that it is pinned below as well
        big(xb)
    was, threads = os.sched_getaffinity(0), torch.get_num_threads()
    one = {min(was)}
    tasks = [int(t.name) for t in Path("/proc/self/task").iterdir()]
    torch.set_num_threads(1)    # a shard's step: one torch thread, the team beside it
    try:
        for tid in tasks:
            os.sched_setaffinity(tid, one)
        alone = call_ms(60)
        with qmatmul.team(2):
            shared = call_ms(60)
            assert torch.equal(big(xb), want)
    finally:
        torch.set_num_threads(threads)
        for tid in tasks:
            try:
                os.sched_setaffinity(tid, was)
            except OSError:     # a thread that ended meanwhile
                pass
    assert shared < 2 * alone + 0.05, f"{shared:.3f} ms a call with a helper on the caller's core, {alone:.3f} alone"


_TABLES = []   # node tables the kernel was pointed at: kept mapped for the process's life


def test_lending_helpers_join_only_while_no_other_shard_steps(tmp_path, monkeypatch):
    """Inside qmatmul.lend(2) a call takes the helper only while no other process of the
    machine's table is stepping: with this process alone its helper runs chunks, with another
    live process marked stepping it runs none; the same bits either way. A slot of a process
    that is gone is cleared when a process joins."""
    monkeypatch.setattr(qmatmul, "NODE_TABLE", tmp_path / "steps")
    big = W4A8CpuLinear(torch.randn(4096, 1024) / 8)
    xb = torch.randn(8, 1024)
    want = big(xb)
    words = torch.zeros(qmatmul.NODE_TABLE_BYTES // 4, dtype=torch.int32)
    words[60:62] = torch.tensor([2 ** 31 - 2, 1], dtype=torch.int32)   # no such pid, left stepping
    (tmp_path / "steps").write_bytes(words.numpy().tobytes())
    qmatmul._node_table.cache_clear()
    table = qmatmul._node_table()
    _TABLES.append(table)
    assert table is not None
    slots = torch.frombuffer(bytearray(table[:]), dtype=torch.int32).view(-1, 2)
    assert slots[30].tolist() == [0, 0] and os.getpid() in slots[:, 0].tolist()   # the dead one cleared

    def helper_chunks(calls: int) -> int:
        before = qmatmul.lent()
        with qmatmul.stepping(), qmatmul.lend(2):
            for _ in range(calls):
                assert torch.equal(big(xb), want)
        return qmatmul.lent() - before

    assert helper_chunks(200) > 0
    table[63 * 8:64 * 8] = torch.tensor([os.getppid(), 1], dtype=torch.int32).numpy().tobytes()
    try:
        assert helper_chunks(200) == 0
    finally:
        table[63 * 8:64 * 8] = bytes(8)
    assert helper_chunks(200) > 0


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process (Linux /proc), by native thread id."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def test_amx_path_gives_the_vnni_paths_bits():
    """Steps of 16 activation rows and more take AMX tiles where the CPU grants them (several
    tiles, a part tile, 1 and 2 levels, 4-bit and 8-bit, 1 and 2 threads): each row gets the
    bits it gets alone through the VNNI path. Elsewhere both calls run one path and agree."""
    from shards.compress.qmatmul import amx
    w, *_ = grid4(96, 160, seed=4)
    x = torch.randn(41, 160)
    x[:, 7] *= 50
    mods = [W4A8CpuLinear(w), W4A8CpuLinear(w, levels=1), Q8Linear.from_rows(lambda a, b: w[a:b], 96)]
    was, on = torch.get_num_threads(), amx()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mod in mods:
                alone = torch.cat([mod(x[i:i + 1]) for i in range(41)])
                amx(False)
                vnni_rows = mod(x)
                amx(True)
                for b in (8, 16, 17, 41):
                    assert torch.equal(mod(x[:b]), alone[:b]), (type(mod).__name__, mod.levels, threads, b)
                assert torch.equal(vnni_rows, alone)
    finally:
        torch.set_num_threads(was)
        amx(on)


AVX2 = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.mark.parametrize("flag, path", [
    ("-DSHARDSERVE_GENERIC", 0),
    pytest.param("-DSHARDSERVE_AVX2", 1, marks=pytest.mark.skipif(not AVX2, reason="the CPU has no AVX2")),
])
def test_other_paths_give_the_same_bits(flag, path):
    """The portable loops (SHARDSERVE_GENERIC) and the AVX2 path (SHARDSERVE_AVX2, for CPUs
    without AVX-512) built beside the op's own path: the same bits, 4-bit and 8-bit, 1 and 2
    levels, an outlier channel, 13 rows (whole and part tiles), 1 and 2 threads."""
    lib = kernels.load(SOURCE, (flag,))
    assert lib.qmatmul_path() == path
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qmatmul.argtypes = [p, p, p, p, i64, i64, i64, i32, i32, i32, i32]
    w, *_ = grid4(48, 128, seed=3)
    x = torch.randn(13, 128)
    x[:, 9] *= 50
    mods = (W4A8CpuLinear(w), W4A8CpuLinear(w, levels=1), W4A8CpuLinear(w, grid=q4_0_grid(w)),
            Q8Linear.from_rows(lambda a, b: w[a:b], 48))
    for mod in mods:
        for threads in (1, 2):
            y = torch.empty(13, 48)
            assert lib.qmatmul(x.data_ptr(), mod.packed.data_ptr(), mod.scales.data_ptr(), y.data_ptr(),
                               13, 48, 128, mod.bits, mod.levels, int(not mod.symmetric), threads) == 0
            assert torch.equal(y, mod(x)), (type(mod).__name__, mod.levels, threads)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        W4A8CpuLinear(torch.ones(16, 40))
    with pytest.raises(ValueError, match="by 16"):
        W4A8CpuLinear(torch.ones(8, 32))
    with pytest.raises(ValueError, match="16 x 32 multiples"):
        Q8Linear.from_rows(lambda a, b: torch.ones(b - a, 32), 24)
    packed, scales = pack(torch.zeros(16, 32, dtype=torch.int32), torch.ones(16, 1), torch.zeros(16, 1), 4)
    with pytest.raises((ValueError, RuntimeError), match="levels"):   # RuntimeError: from the C++ kernel
        torch.ops.shardserve.qmatmul(torch.ones(1, 32), packed, scales, 16, 4, 3)


def test_source_weights_kept_exactly(source):
    """The default GGUF: its Q4_1 projections and its Q8_0 embedding table come back bit for
    bit from what w4a8x2 stores."""
    name = "model.layers.3.mlp.down_proj.weight"
    w = source.tensor(name)
    assert torch.equal(W4A8CpuLinear(w, None, source.int4_grid(name)).dequantized(), w)
    rows = source.rows("model.embed_tokens.weight", 0, 4096)
    assert torch.equal(Q8Linear.from_rows(lambda a, b: rows[a:b], 4096).dequantized(), rows)


# the largest logit difference from fp32: two levels (~15 bits a group) 0.0095 measured, one
# (~8 bits, as llama.cpp's Q8_0) 2.6 over the vocabulary, where " Paris" (17.4) leads the next by 2.5
@pytest.mark.parametrize("spec, tol", [("w4a8x2", 0.05), ("w4a8x1", 4.0)])
def test_w4a8_stages_match_fp32(source, tokenizer, spec, tol):
    """Two w4a8x2 (w4a8x1) stages of the default model against one fp32 stage: the same weights
    (the file's), every projection and the lm_head at the method's activation levels, so logits
    agree and " Paris" follows; plan bytes = built bytes."""
    from shards.compress.costs import measure_costs
    from shards.compress.qmatmul import GroupQuantLinear
    from shards.compress.registry import method
    from shards.model.generator import Generator
    from shards.model.step import StepBatch
    from shards.plan.planner import shard_weight_bytes
    ids = tokenizer.encode("The capital of France is")
    batch = lambda: StepBatch([0], [0], [len(ids)], tokens=torch.tensor([ids]))  # noqa: E731
    gen, ref = Generator(source, 2, compression=spec), Generator(source, 1)
    got, want = gen.step(batch()), ref.step(batch())
    assert (got - want).abs().max() < tol and tokenizer.decode([int(got.argmax())]) == " Paris"
    levels = {m.levels for s in gen.stages for m in s.modules() if isinstance(m, GroupQuantLinear)}
    assert levels == {method(spec).act_levels}
    costs = measure_costs(source, spec)
    assert [s.weight_bytes() for s in gen.stages] == [shard_weight_bytes(costs, s.layers) for s in gen.stages]
