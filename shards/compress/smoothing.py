"""SmoothQuant's smoothing for w8a8 (shards/compress/quantize.py::W8A8CpuLinear).

Activations quantized to int8 per token lose their small channels to the few large ones;
SmoothQuant (Xiao et al. 2023) divides each input channel j by s_j = amax_j^a / wmax_j^(1-a)
and multiplies the weight's column j by it, so x W^T is unchanged and both sides quantize
better. amax_j is the largest |x_j| the projection sees on calibration text (the serving prompts
unless told), wmax_j the largest |W_ij|. Measured on the default model (WikiText-2 ppl, seqlen
512 x 8 windows; fp32 30.60), first simulated: per-token W8A8 on every projection and the
lm_head, unsmoothed 31.82; smoothed at a = 0.3 / 0.4 / 0.5: 31.81 / 31.38 / 31.03; at 0.5 with
down_proj kept weight-only 30.74 (its SiLU(gate) * up input has outliers smoothing does not
tame: smoothing it too gave 30.97 at a = 0.5, 31.14 at 0.7, 30.95 at 0.85). So down_proj keeps
w8a16's weights and multiplies two int8 levels of its input, prefill and decode alike
(shards/compress/quantize.py::two_level_mm; 30.62 over 8 windows, 29.11 over 32). With an fp32 prefill
GEMM instead (instead of two int8 levels), a = 0.45 / 0.5 / 0.55 / 0.6: 30.87 / 30.84 / 30.64 / 30.67; a = 0.55,
chosen on those windows, gives 1.007x fp32 over 32 windows and 1.009x on the 24 not used to
choose it (docs/performance.md).

The maxima are those of the fp32 model the stage serves (a raw source, or a prepared
artifact's pruned weights), computed once over every layer and the final norm (16 s for the
default model, 1 thread) and cached on disk by the weights' fingerprint and the calibration
text: a restart, a re-shard or a recompress reads them in milliseconds.
"""
from __future__ import annotations

import torch

ALPHA = 0.55
SMOOTHED = ("qkv_proj", "o_proj", "gate_up_proj")   # down_proj: weight-only int8 codes (above)
HEAD = "lm_head"


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s [in] for weight [out, in] whose inputs reached |x_j| <= act_max[j]. Clamped to
    [1e-3, 1e3] so a channel dead in calibration cannot blow up a live one at serving time."""
    w_max = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(1e-3, 1e3)


