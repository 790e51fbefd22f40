"""Compression specs: one grammar everywhere (CLI, config, API). Pure: no torch import.

    fp32 | bf16 | int8 | nf4 | fp4 | int8-cpu | int4-cpu   quantization (int8/nf4/fp4: bitsandbytes)
    w8a8-cpu                                             int8 weights and activations (smoothed;
                                                         alone, or on a prepared artifact)
    w4a8-cpu                                             int4-cpu's 4-bit weights, activations
                                                         two int8 levels per group of 32 (our
                                                         kernel, shards/qmatmul.py)
    magnitude:S | wanda:S | 2:4                          pruning, S = sparsity in (0, 1)
    sparsegpt:S | sparsegpt:2:4                          pruning with SparseGPT's weight update
    cut-mlp:F | cut-heads:F | drop-layers:N              structured cuts
    gptq                                                 with int8-cpu, int4-cpu or nf4: GPTQ's
                                                         error compensation (shards/gptq.py)
    combined with '+', e.g. nf4+wanda:0.5; or a preset name (fast, balanced, smallest)
"""
from __future__ import annotations

from dataclasses import dataclass

from shards.errors import ShardServeError

QUANTS = ("fp32", "bf16", "int8", "nf4", "fp4", "int8-cpu", "int4-cpu", "w8a8-cpu", "w4a8-cpu")
FOUR_BIT = ("int4-cpu", "w4a8-cpu")   # group-wise 4-bit weights: a Q4 source's own codes are kept
PRUNES = ("magnitude", "wanda", "2:4")
CUTS = ("cut-mlp", "cut-heads", "drop-layers")
PRESETS = {"fast": "w4a8-cpu", "balanced": "int4-cpu", "smallest": "nf4+cut-mlp:0.2"}
GPTQ_QUANTS = ("int8-cpu", "int4-cpu", "nf4")
VALID = ("fp32, bf16, int8, nf4, fp4, int8-cpu, int4-cpu, w8a8-cpu, w4a8-cpu, gptq (with int8-cpu, int4-cpu or nf4), magnitude:S, wanda:S, 2:4, sparsegpt:S, "
         "sparsegpt:2:4, cut-mlp:F, cut-heads:F, drop-layers:N (S, F in (0, 1)), joined with '+'; presets: " + ", ".join(PRESETS))


class CompressionError(ShardServeError, ValueError):
    pass


@dataclass(frozen=True)
class Compression:
    quant: str = "fp32"
    prune: str | None = None        # magnitude | wanda | 2:4 | sparsegpt | sparsegpt-2:4
    sparsity: float = 0.0
    cut_mlp: float = 0.0            # fraction of MLP neurons removed
    cut_heads: float = 0.0          # fraction of KV-head groups removed
    drop_layers: int = 0            # whole layers removed
    gptq: bool = False              # quantize with GPTQ's error compensation (calibrated)

    @property
    def spec(self) -> str:
        parts = [self.quant] if self.quant != "fp32" or not self._extras() else []
        return "+".join(parts + (["gptq"] if self.gptq else []) + self._extras())

    def _extras(self) -> list[str]:
        out = []
        if self.prune in ("2:4", "sparsegpt-2:4"):
            out.append(self.prune.replace("-", ":"))
        elif self.prune:
            out.append(f"{self.prune}:{self.sparsity:g}")
        out += [f"cut-mlp:{self.cut_mlp:g}"] if self.cut_mlp else []
        out += [f"cut-heads:{self.cut_heads:g}"] if self.cut_heads else []
        out += [f"drop-layers:{self.drop_layers}"] if self.drop_layers else []
        return out

    @property
    def structure(self) -> "Compression":
        """Everything but the quantization: what changes the fp32 weights and shapes."""
        return Compression(prune=self.prune, sparsity=self.sparsity, cut_mlp=self.cut_mlp,
                           cut_heads=self.cut_heads, drop_layers=self.drop_layers)

    @property
    def calibrated(self) -> bool:
        """Needs calibration activations (Wanda, SparseGPT, GPTQ, structured cuts, layer drops)."""
        return self.prune in ("wanda", "sparsegpt", "sparsegpt-2:4") or \
            bool(self.cut_mlp or self.cut_heads or self.drop_layers or self.gptq)

    def __str__(self) -> str:
        return self.spec


def _fraction(name: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise CompressionError(f"{name}:{text}: {text!r} is not a number; valid: {VALID}") from None
    if not 0 < v < 1:
        raise CompressionError(f"{name}:{text}: needs a fraction in (0, 1); valid: {VALID}")
    return v


def parse(spec: str | Compression) -> Compression:
    """'nf4+wanda:0.5' -> Compression(quant='nf4', prune='wanda', sparsity=0.5). Refuses bad specs
    with the list of valid ones."""
    if isinstance(spec, Compression):
        return spec
    spec = PRESETS.get(spec.strip(), spec.strip())
    kw: dict = {}
    for part in filter(None, spec.split("+")):
        name, _, arg = part.partition(":")
        if part in QUANTS:
            key, val = "quant", part
        elif part == "gptq":
            key, val = "gptq", True
        elif part == "2:4":
            key, val = "prune", "2:4"
        elif part == "sparsegpt:2:4":
            key, val = "prune", "sparsegpt-2:4"
        elif name in ("magnitude", "wanda", "sparsegpt") and arg:
            key, val = "prune", name
            kw["sparsity"] = _fraction(name, arg)
        elif name in ("cut-mlp", "cut-heads") and arg:
            key, val = name.replace("-", "_"), _fraction(name, arg)
        elif name == "drop-layers" and arg.isdigit() and int(arg) > 0:
            key, val = "drop_layers", int(arg)
        else:
            raise CompressionError(f"unknown compression {part!r} in {spec!r}; valid: {VALID}")
        if key in kw:
            raise CompressionError(f"{spec!r} sets {key.replace('_', '-')} twice")
        kw[key] = val
    if not kw:
        raise CompressionError(f"empty compression spec; valid: {VALID}")
    if kw.get("gptq") and kw.get("quant") not in GPTQ_QUANTS:
        raise CompressionError(f"gptq needs one of {', '.join(GPTQ_QUANTS)} beside it in {spec!r} "
                               f"(it quantizes), got {kw.get('quant', 'none')}")
    if kw.get("quant") == "w8a8-cpu" and len(kw) > 1:
        raise CompressionError(f"w8a8-cpu smooths with the activation maxima of the weights it serves, so it "
                               f"takes no other compression in {spec!r}: prepare the rest first (`shardserve "
                               f"prepare`), then serve the artifact at w8a8-cpu")
    return Compression(**kw)
