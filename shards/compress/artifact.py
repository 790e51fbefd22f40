"""`prepare`: compress and calibrate once, measure, write an artifact folder (docs/compression.md).

The folder is a Hugging Face model folder, so every loader reads it: config.json, tokenizer
files, model.safetensors holding the cut and pruned weights in fp32 (cut layers have their own
smaller shapes; dropped layers are absent; after GPTQ, exactly on their quantization grids,
which gptq.safetensors holds), and manifest.json: the compression, which layers were
dropped, per-layer shapes and resident bytes at the target quantization, the calibration source,
and the perplexity measured on the artifact. Quantization is not stored: it is deterministic and
takes seconds, so stages apply it at load (and a shard can change it at run time); GPTQ's grids
are, so the kernel gets exactly the calibrated codes without calibrating again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from shards.compress.calibration import CalibrationData, held_out
from shards.compress.gptq import ACT_ORDER, DAMP, GROUP, grid_tensors
from shards.compress.obs import BLOCK
from shards.compress.spec import parse
from shards.plan.layer_range import LayerRange

# Block attribute -> HF tensor name suffix (fused projections are split back below)
NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         "o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}


def _split(block) -> dict:
    """HF tensors of the block's fused qkv_proj and gate_up_proj."""
    hd, out = block.head_dim, {}
    sizes = [block.n_heads * hd, block.n_kv * hd, block.n_kv * hd]
    for kind, t in block.qkv_proj.named_parameters():
        for x, part in zip("qkv", t.split(sizes)):
            out[f"self_attn.{x}_proj.{kind}"] = part
    gate, up = block.gate_up_proj.weight.chunk(2)
    return {**out, "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up}


def stage_tensors(stage) -> dict:
    """The fp32 stage's tensors under their HF names (the lm_head only when untied)."""
    out = {"model.embed_tokens.weight": stage.embed.weight, "model.norm.weight": stage.norm.weight}
    if not stage.config.tie_word_embeddings:
        out["lm_head.weight"] = stage.lm_head.weight
    for key, block in stage.blocks.items():
        for attr, name in NAMES.items():
            for kind, t in getattr(block, attr).named_parameters():
                out[f"model.layers.{key}.{name}.{kind}"] = t
        out.update({f"model.layers.{key}.{k}": t for k, t in _split(block).items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def gptq_tensors(stage) -> dict:
    """Every projection's GPTQ grid as `gptq.model.layers.<L>.<projection>.<field>` tensors."""
    return {f"gptq.model.layers.{key}.{proj}.{k}": t for key, block in stage.blocks.items()
            for proj, grid in block.grids.items() for k, t in grid_tensors(grid).items()}


def layer_shapes(stage) -> dict:
    return {key: {"heads": b.n_heads, "kv_heads": b.n_kv, "mlp": b.down_proj.weight.shape[1]}
            for key, b in stage.blocks.items()}


def prepare(source, compression: str, out: str | Path, seqlen: int = 512, windows: int | None = 4,
            progress: bool = False, calibration: CalibrationData | None = None) -> dict:
    """Write the artifact for `compression` to `out`; returns its manifest. calibration:
    default the serving prompts; the windows the manifest's perplexity reads are held out of it."""
    from safetensors.torch import save_file

    from shards.compress.costs import measure_costs
    from shards.compress.perplexity import DEFAULT_TEXT, perplexity
    from shards.model.source import HFFolderSource
    from shards.model.stage import Stage
    comp, out, t0 = parse(compression), Path(out), time.time()
    calibration = held_out(calibration or CalibrationData(), DEFAULT_TEXT, windows and seqlen * windows)
    out.mkdir(parents=True, exist_ok=True)
    # GPTQ quantizes while it calibrates: its fp32 weights lie on grids, stored beside them
    stage = Stage(source, LayerRange(0, source.n_layers), kv_blocks=1,
                  compression=comp if comp.gptq else comp.structure, quantize=False,
                  calibration=calibration)
    save_file(stage_tensors(stage), out / "model.safetensors")
    if comp.gptq:
        save_file(gptq_tensors(stage), out / "gptq.safetensors")
    source.config.save_pretrained(out)
    source.tokenizer().save_pretrained(out)
    manifest = {
        "source": source.label, "compression": comp.spec, "dropped_layers": sorted(stage.dropped),
        "calibration": calibration.describe(bool(comp.gptq)) if comp.calibrated else None,
        "gptq": ({"quant": comp.quant, "damp": DAMP, "act_order": ACT_ORDER, "block": BLOCK, "group": GROUP,
                  "grid": "static, round-to-nearest of the weights before GPTQ, as the kernel stores it",
                  "refit": "least-squares scales (and int4 zeros) after the sweep, codes fixed",
                  "mean_correction": "o_proj, down_proj biases"}
                 if comp.gptq else None),
        "layer_shapes": layer_shapes(stage), "prepare_seconds": None}
    del stage
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    prepared = HFFolderSource(out)
    costs = measure_costs(prepared, comp.spec, use_cache=False)
    r = perplexity(prepared, comp.spec, seqlen, windows, progress=progress)
    manifest.update(layer_bytes=list(costs.layer_bytes), weight_bytes=r.weight_bytes,
                    ppl={"ppl": r.ppl, "seqlen": r.seqlen, "windows": r.windows, "text": "wikitext-2-raw-test"},
                    prepare_seconds=round(time.time() - t0, 1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
