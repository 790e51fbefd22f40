"""Compression specs: one grammar everywhere (CLI, config, API). Pure: no torch import.

    <method>                                       a quantization of the registry
                                                   (shards/compress/registry.py: fp32, bf16, w8a16,
                                                   w4a16, w8a8, w4a8x2, w4a8x1, llm-int8, nf4,
                                                   fp4; older names such as int8-cpu are aliases)
    magnitude:S | wanda:S | 2:4                    pruning, S = sparsity in (0, 1)
    sparsegpt:S | sparsegpt:2:4                    pruning with SparseGPT's weight update
    cut-mlp:F | cut-heads:F | drop-layers:N        structured cuts
    gptq                                           with a method whose grid GPTQ fits (w8a16, w4a16,
                                                   nf4): GPTQ's error compensation
    combined with '+', e.g. nf4+wanda:0.5; or a preset name (fast, balanced, smallest)
"""
from __future__ import annotations

from dataclasses import dataclass

from shards.compress import registry
from shards.compress.registry import METHODS, PRESETS, CompressionError, Method

__all__ = ["Compression", "CompressionError", "parse"]
CALIBRATED_PRUNES = ("wanda", "sparsegpt", "sparsegpt-2:4")   # prunes that need activations


def _valid() -> str:
    gptq = ", ".join(m.name for m in METHODS if m.gptq)
    return (", ".join(m.name for m in METHODS) + f", gptq (with {gptq}), magnitude:S, wanda:S, 2:4, "
            "sparsegpt:S, sparsegpt:2:4, cut-mlp:F, cut-heads:F, drop-layers:N (S, F in (0, 1)), joined with "
            "'+'; presets: " + ", ".join(PRESETS))


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
    def method(self) -> Method:
        """The registry's record of this spec's quantization."""
        return registry.method(self.quant)

    @property
    def spec(self) -> str:
        parts = [self.quant] if self.quant != registry.UNQUANTIZED or not self._extras() else []
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
        return self.prune in CALIBRATED_PRUNES or \
            bool(self.cut_mlp or self.cut_heads or self.drop_layers or self.gptq)

    def __str__(self) -> str:
        return self.spec


def _fraction(name: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise CompressionError(f"{name}:{text}: {text!r} is not a number; valid: {_valid()}") from None
    if not 0 < v < 1:
        raise CompressionError(f"{name}:{text}: needs a fraction in (0, 1); valid: {_valid()}")
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
        if registry.is_method(part):
            key, val = "quant", registry.canonical(part)
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
            raise CompressionError(f"unknown compression {part!r} in {spec!r}; valid: {_valid()}")
        if key in kw:
            raise CompressionError(f"{spec!r} sets {key.replace('_', '-')} twice")
        kw[key] = val
    if not kw:
        raise CompressionError(f"empty compression spec; valid: {_valid()}")
    quant = registry.method(kw.get("quant", "fp32"))
    if kw.get("gptq") and not (quant.gptq and "quant" in kw):
        fits = ", ".join(m.name for m in METHODS if m.gptq)
        raise CompressionError(f"gptq needs one of {fits} beside it in {spec!r} "
                               f"(it quantizes), got {kw.get('quant', 'none')}")
    if quant.act_maxima and len(kw) > 1:
        raise CompressionError(f"{quant.name} smooths with the activation maxima of the weights it serves, so it "
                               f"takes no other compression in {spec!r}: prepare the rest first (`shardserve "
                               f"prepare`), then serve the artifact at {quant.name}")
    return Compression(**kw)
