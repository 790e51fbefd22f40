"""`shardserve synth`: published shapes, streamed safetensors, deterministic weights, and a
synthetic model through the pipeline equal to transformers on the same folder."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shards.model.synth import SHAPES, file_groups, tensor_shapes

MiB = 1 << 20
LIMIT = 512 << 10     # bytes per safetensors file in the tests: several files
# a llama-3.2-1b / qwen2.5-14b layout at a size a test can run; the tokenizer's vocabulary
TINY = {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 49152}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.unit
def test_shapes_have_the_published_parameter_counts():
    counts = {k: sum(numel(s) for _, s in tensor_shapes(cfg)) for k, cfg in SHAPES.items()}
    assert counts == {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-14b": 14_770_033_664}
    names = dict(tensor_shapes(SHAPES["qwen2.5-14b"]))
    assert names["model.layers.0.self_attn.k_proj.bias"] == (1024,) and "lm_head.weight" in names
    assert "lm_head.weight" not in dict(tensor_shapes(SHAPES["llama-3.2-1b"]))      # tied, as published


@pytest.mark.unit
def test_files_stay_under_the_limit_in_order():
    shapes = tensor_shapes(SHAPES["llama-3.1-8b"])
    groups = file_groups(shapes, 2)
    assert [t for g in groups for t in g] == shapes
    assert all(sum(numel(s) for _, s in g) * 2 <= 2 << 30 for g in groups)
    assert len(groups) == 8      # 16.06 GB of bf16 in files of at most 2 GiB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from shards.model.synth import synth
    root = tmp_path_factory.mktemp("synth")
    return {like: synth(like, root / like, "bfloat16", 7, TINY, max_file_bytes=LIMIT)
            for like in ("llama-3.2-1b", "qwen2.5-14b")}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.model
def test_folder_is_complete_deterministic_and_drawn_as_configured(tiny, tmp_path):
    from safetensors import safe_open

    from shards.model.synth import synth
    folder = tiny["llama-3.2-1b"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    per_file = {f.name: sum(v == f.name for v in index["weight_map"].values()) for f in files}
    # a file stays under the limit (its header aside) unless one tensor alone is larger (the embedding)
    assert len(files) > 2 and all(f.stat().st_size <= LIMIT + 64 * 1024 or per_file[f.name] == 1 for f in files)
    assert set(index["weight_map"]) == {n for n, _ in tensor_shapes({**SHAPES["llama-3.2-1b"], **TINY})}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["synthetic"]["seed"] == 7
    with safe_open(str(folder / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.up_proj.weight").float()
    with safe_open(str(folder / index["weight_map"]["model.norm.weight"]), "pt") as f:
        norm = f.get_tensor("model.norm.weight")
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001 and bool((norm == 1).all())
    assert _digest(synth("llama-3.2-1b", tmp_path / "same", "bfloat16", 7, TINY, max_file_bytes=LIMIT)) == _digest(folder)
    assert _digest(synth("llama-3.2-1b", tmp_path / "other", "bfloat16", 8, TINY, max_file_bytes=LIMIT)) != _digest(folder)


@pytest.mark.model
@pytest.mark.parametrize("like", ["llama-3.2-1b", "qwen2.5-14b"])
def test_two_stages_give_transformers_logits(tiny, like):
    import torch
    from transformers import AutoModelForCausalLM

    from shards import LayerRange
    from shards.model.generator import Generator
    from shards.model.source import open_source
    hf = AutoModelForCausalLM.from_pretrained(tiny[like], dtype=torch.float32)
    gen = Generator(open_source(str(tiny[like])), [LayerRange(0, 2), LayerRange(2, 4)])
    ids = list(range(100, 400))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = gen.logits(ids)
    assert (got - want).abs().max().item() < 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.model
def test_writing_holds_a_chunk_not_a_tensor(tmp_path):
    """The 1B shape's 501 MiB embedding (128256 x 2048 bf16): the writer's peak RSS grows by
    far less than that tensor (it holds one 64 MiB chunk of fp32 and its bf16 copy)."""
    # the peak (VmHWM) is reset after the tokenizer's first load, which has its own (a GGUF read)
    script = (
        "import re; from shards.model.source import open_source; open_source('default').tokenizer();"
        "from shards.model.synth import synth;"
        "status = lambda k: int(re.search(k + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024;"
        "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS');"
        f"synth('llama-3.2-1b', {str(tmp_path / 'big')!r}, 'bfloat16', 0, {{'num_hidden_layers': 1}});"
        "print(status('VmHWM') - before)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grew = int(out.stdout.split()[-1])
    largest = 128256 * 2048 * 2
    print(f"peak RSS grew {grew / MiB:.0f} MiB while writing; the largest tensor is {largest / MiB:.0f} MiB")
    assert grew < largest


@pytest.mark.ray
def test_served_in_two_shards_greedy_equals_transformers(tiny, loop):
    """synth -> plan -> two shard actors -> the router: the greedy tokens transformers picks, and
    each shard's RSS within 10% of what the plan said."""
    import torch
    from transformers import AutoModelForCausalLM

    from serving.config import load
    from serving.launch import build_engine
    from shards.model.step import SamplingParams
    from shards.runtime.actor import stop_pipeline
    folder = str(tiny["qwen2.5-14b"])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = list(range(200, 240))
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()
    engine = loop.run_until_complete(build_engine(load(model=folder, shards=2, prefix="syn-", kv_tokens=1024,
                                                       compile=False, compression="fp32", control=False)))
    try:
        out = loop.run_until_complete(engine.complete(prompt, SamplingParams(max_tokens=24)))
        eos = hf.config.eos_token_id       # whether either side lists the end token it stopped at
        assert [t for t in out.token_ids if t != eos] == [t for t in want if t != eos] and len(want) > 8
        # the plan predicted each process: runtime, weights and KV at rest (shards/plan/footprint.py)
        for spec, st in zip(engine.plan.shards, loop.run_until_complete(engine.stats())):
            f = spec.footprint
            print(f"shard {spec.index}: planned {f.at_rest / MiB:.0f} MiB at rest (runtime {f.runtime / MiB:.0f}), "
                  f"RSS {st.rss_bytes / MiB:.0f} MiB (runtime {st.base_rss_bytes / MiB:.0f})")
            assert abs(f.at_rest / st.rss_bytes - 1) < 0.10 and f.runtime > 0
    finally:
        engine.close()
        stop_pipeline("syn-")
