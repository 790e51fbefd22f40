"""Model sources: HF folder, GGUF, default; and the errors bad input gets."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from shards import LayerRange, ModelSourceError
from shards.model.generator import Generator
from shards.model.source import GGUFSource, HFFolderSource, open_source

pytestmark = pytest.mark.model


def test_default_source_config(source):
    cfg = source.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("llama", 30, 576, 3)
    assert source.tensor("model.layers.4.self_attn.k_proj.weight").shape == (192, 576)


def test_tokenizer_has_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_hf_folder_matches_transformers(tiny_folder):
    """A tiny random Llama in a HF folder: stages [0,1)+[1,4) give transformers' logits."""
    from transformers import LlamaForCausalLM
    src = HFFolderSource(tiny_folder)
    ref = LlamaForCausalLM.from_pretrained(tiny_folder).eval()
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits[0]
    got = Generator(src, [LayerRange(0, 1), LayerRange(1, 4)]).logits(ids[0].tolist())
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_missing_file_and_folder():
    with pytest.raises(ModelSourceError, match="model file /nope/x.gguf not found"):
        open_source("/nope/x.gguf")
    with pytest.raises(ModelSourceError, match="not found: expected 'default', a .gguf file or a model folder"):
        open_source("/nope/folder")


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelSourceError, match="bad.gguf: not a readable GGUF file"):
        GGUFSource(bad)


def test_gguf_cache_is_built_from_one_parse(source, tokenizer, tmp_path, monkeypatch):
    """A first open parses the GGUF once (transformers' config and tokenizer loaders reuse that
    parse) and writes the same config and tokenizer as the `source` fixture's cache."""
    import gguf
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "cache"))
    parses = []
    parse = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or parse(*a, **k))
    fresh = GGUFSource(source.path)
    assert len(parses) == 1 and fresh.cache.parent == tmp_path / "cache"
    own = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert own(fresh.config) == own(source.config)
    text = "Paris est la capitale de la France. 1234"
    assert fresh.tokenizer()(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf.GGUFReader is not parse and fresh._tensors == source._tensors


def test_folder_without_weights_and_unsupported_arch(tiny_folder, tmp_path):
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(tiny_folder / "config.json", empty / "config.json")
    with pytest.raises(ModelSourceError, match="no \\*.safetensors weights"):
        HFFolderSource(empty)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported; shardserve runs Llama-family"):
        HFFolderSource(gpt2)


def test_corrupt_safetensors(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelSourceError, match="corrupt safetensors file"):
        HFFolderSource(bad)


def test_cli_errors_without_traceback():
    for args, msg in [(["plan", "--model", "/nope.gguf"], "model file /nope.gguf not found"),
                      (["plan", "--shards", "0"], "need at least one shard, got 0"),
                      (["plan", "--shards", "31"], "31 shards for 30 layers")]:
        r = subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_plan_json():
    r = subprocess.run([sys.executable, "-m", "serving.cli", "plan", "--shards", "3", "--json"],
                       capture_output=True, text=True, check=True)
    shards = json.loads(r.stdout)["shards"]
    assert [s["start"] for s in shards] == [0, 13, 26] and shards[-1]["end"] == 30
    assert all(s["weight_bytes"] > 0 and s["kv_tokens"] == 8192 for s in shards)


def test_long_context_prompts_for_the_bench(tokenizer):
    """`shardserve bench --context N`: each prompt after its own N-token WikiText-2 passage."""
    from shards.data import read_prompts, with_context
    base = read_prompts(3)
    long = with_context(base, 500, tokenizer)
    assert [p.endswith("\n\n" + b) for p, b in zip(long, base)] == [True] * 3
    passages = [p[:-len(b)] for p, b in zip(long, base)]
    assert len(set(passages)) == 3
    assert all(490 <= len(tokenizer(x)["input_ids"]) <= 510 for x in passages)   # decode/encode may merge a few
    assert with_context(base, 0, tokenizer) == base
    later = with_context(base, 500, tokenizer, first=3)   # the next bench level: passages 3, 4, 5
    assert not set(passages) & {p[:-len(b)] for p, b in zip(later, base)}
    assert with_context(base[:1], 500, tokenizer, first=1)[0] == long[1][:-len(base[1])] + base[0]
