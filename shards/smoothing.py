"""SmoothQuant's smoothing for w8a8-cpu (shards/quantize.py::W8A8CpuLinear).

Activations quantized to int8 per token lose their small channels to the few large ones;
SmoothQuant (Xiao et al. 2023) divides each input channel j by s_j = amax_j^a / wmax_j^(1-a)
and multiplies the weight's column j by it, so x W^T is unchanged and both sides quantize
better. amax_j is the largest |x_j| the projection sees on calibration text (the serving prompts
unless told), wmax_j the largest |W_ij|. Measured on the default model (WikiText-2 ppl, seqlen
512 x 8 windows; fp32 30.60), first simulated: per-token W8A8 on every projection and the
lm_head, unsmoothed 31.82; smoothed at a = 0.3 / 0.4 / 0.5: 31.81 / 31.38 / 31.03; at 0.5 with
down_proj kept weight-only 30.74 (its SiLU(gate) * up input has outliers smoothing does not
tame: smoothing it too gave 30.97 at a = 0.5, 31.14 at 0.7, 30.95 at 0.85). So down_proj keeps
int8-cpu's weights and multiplies two int8 levels of its input, prefill and decode alike
(shards/quantize.py::two_level_mm; 30.62 over 8 windows, 29.11 over 32). With an fp32 prefill
GEMM instead (as built before session 11), a = 0.45 / 0.5 / 0.55 / 0.6: 30.87 / 30.84 / 30.64 / 30.67; a = 0.55,
chosen on those windows, gives 1.007x fp32 over 32 windows and 1.009x on the 24 not used to
choose it (README, "Where the time goes").

The maxima are those of the fp32 model the stage serves (a raw source, or a prepared
artifact's pruned weights), computed once over every layer and the final norm (16 s for the
default model, 1 thread) and cached on disk by the weights' fingerprint and the calibration
text: a restart, a re-shard or a recompress reads them in milliseconds.
"""
from __future__ import annotations

import fcntl
import hashlib
import os

import torch

ALPHA = 0.55
SMOOTHED = ("qkv_proj", "o_proj", "gate_up_proj")   # down_proj: weight-only int8 codes (above)
HEAD = "lm_head"


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s [in] for weight [out, in] whose inputs reached |x_j| <= act_max[j]. Clamped to
    [1e-3, 1e3] so a channel dead in calibration cannot blow up a live one at serving time."""
    w_max = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(1e-3, 1e3)


def activation_maxima(source, data=None) -> dict:
    """{layer: {projection: amax [in]}, HEAD: amax [hidden]} of the fp32 model `source` on the
    calibration text `data` (a CalibrationData; None: the serving prompts), from the disk cache
    when there is one."""
    from shards.calibration import CalibrationData
    from shards.source import cache_dir
    data = data or CalibrationData()
    key = f"v1|{source.fingerprint()}|{data.path}|{data.tokens}|{data.skip}"
    path = cache_dir() / "act-max" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the shards of a node load at once: one measures, the others wait for its file
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return torch.load(path)
        maxima = _measure(source, data)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(maxima, tmp)
        os.replace(tmp, path)
    return maxima


@torch.inference_mode()
def _measure(source, data) -> dict:
    """One prefill of the calibration batch through every fp32 layer, one layer in memory at a
    time, with hooks recording each projection's input channel maxima."""
    from shards.calibration import Calibrator
    from shards.block import RMSNorm, fp32_block
    cal = Calibrator(source, data)
    x = torch.nn.functional.embedding(cal.ids, source.tensor("model.embed_tokens.weight").float())
    maxima: dict = {}
    dropped = set(getattr(source, "dropped_layers", ()))     # a prepared artifact's
    for layer in (i for i in range(source.n_layers) if i not in dropped):
        block, seen, hooks = fp32_block(source, layer), {}, []
        for name in SMOOTHED + ("down_proj",):
            hooks.append(getattr(block, name).register_forward_pre_hook(
                lambda _m, args, name=name: seen.__setitem__(name, _channel_max(args[0]))))
        try:
            x = cal.run(block, x)
        finally:
            for h in hooks:
                h.remove()
        maxima[layer] = seen
    norm = RMSNorm(source.tensor("model.norm.weight").float(), source.config.rms_norm_eps)
    maxima[HEAD] = _channel_max(norm(x))
    return maxima


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> max |x| per input channel, [in] fp32."""
    return x.reshape(-1, x.shape[-1]).abs().amax(0).float()
