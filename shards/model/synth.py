"""Random-weight Hugging Face folders of published model shapes (`shardserve synth`).

For capacity, memory and speed only: the dimensions, tensor names, dtypes and file layout are a
real model's, the weights are noise, so the text they generate is noise too. Each folder holds
config.json (with `architectures`, as llama.cpp's converter needs), the default model's
tokenizer and chat template, and safetensors files of at most 2 GiB with their index.

Weights are drawn from N(0, initializer_range), norms are 1, biases 0, deterministic for a seed.
They are streamed: each file's header is written from the shapes first, then every tensor is
drawn and written in row chunks, so the writer holds one chunk (CHUNK_BYTES of fp32), never a
whole tensor or file.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

MAX_FILE_BYTES = 2 << 30
CHUNK_BYTES = 64 << 20           # fp32 drawn at a time
# torch dtype name -> (safetensors dtype, bytes per element); torch is imported only to write
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# the published configs' dimensions (Hugging Face config.json of each model)
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02},
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02},
    "qwen2.5-14b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120,
        "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 48,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02},
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order Hugging Face writes them."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    qkv_bias = cfg.get("attention_bias") or cfg["model_type"] == "qwen2"
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h))]
        if qkv_bias:
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        out += [(p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def file_groups(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int,
                max_file_bytes: int = MAX_FILE_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors split, in order, into files of at most max_file_bytes (a larger tensor alone)."""
    groups, size = [[]], 0
    for name, shape in shapes:
        n = _numel(shape) * itemsize
        if groups[-1] and size + n > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def synth(like: str, out: str | Path, dtype: str = "bfloat16", seed: int = 0, overrides: dict | None = None,
          progress: Callable[[int, int], None] | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> Path:
    """Write the folder of shape `like` (SHAPES, `overrides` on top) to `out`. progress(done,
    total) in bytes after each tensor."""
    from shards.errors import ShardServeError
    if like not in SHAPES:
        raise ShardServeError(f"unknown shape {like!r}; known: {', '.join(SHAPES)}")
    if dtype not in DTYPES:
        raise ShardServeError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    import torch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**SHAPES[like], **(overrides or {})}
    tokenizer = _write_tokenizer(out)
    st_dtype, itemsize = DTYPES[dtype]
    config = {**cfg, "torch_dtype": dtype,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "synthetic": {"like": like, "seed": seed, "note": "random weights: for capacity, memory and speed"}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shapes = tensor_shapes(cfg)
    groups = file_groups(shapes, itemsize, max_file_bytes)
    total = sum(_numel(s) for _, s in shapes) * itemsize
    index = {n: i for i, (n, _) in enumerate(shapes)}
    weight_map, done = {}, 0
    for f, group in enumerate(groups):
        name = f"model-{f + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(out / name, "wb") as fh:
            _write_header(fh, group, itemsize, st_dtype)
            for tensor, shape in group:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + index[tensor])
                _write_tensor(fh, tensor, shape, cfg["initializer_range"], gen, getattr(torch, dtype))
                weight_map[tensor] = name
                done += _numel(shape) * itemsize
                if progress:
                    progress(done, total)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def _write_tokenizer(out: Path):
    """The default model's tokenizer and chat template, saved as a Hugging Face tokenizer."""
    from shards.model.source import open_source
    tok = open_source("default").tokenizer()
    tok.save_pretrained(out)
    return tok


def _write_header(fh, group: list, itemsize: int, st_dtype: str) -> None:
    """A safetensors header: u64 length, then JSON (names, dtype, shape, byte offsets), padded
    with spaces to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        n = _numel(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    fh.write(struct.pack("<Q", len(text)))
    fh.write(text)


def _write_tensor(fh, name: str, shape: tuple[int, ...], std: float, gen, dtype) -> None:
    """Norms 1, biases 0, weights N(0, std) from torch.Generator gen: drawn and written
    CHUNK_BYTES of fp32 at a time, converted to `dtype`."""
    import torch
    rows = shape[0]
    cols = _numel(shape) // rows
    per = max(1, CHUNK_BYTES // (4 * cols))
    fill = 1.0 if name.endswith("norm.weight") else 0.0 if name.endswith(".bias") else None
    for r in range(0, rows, per):
        n = min(per, rows - r)
        chunk = torch.full((n, cols), fill) if fill is not None else torch.randn(n, cols, generator=gen).mul_(std)
        fh.write(chunk.to(dtype).contiguous().view(torch.uint8).numpy().data)
