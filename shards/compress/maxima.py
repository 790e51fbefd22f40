"""w8a8-cpu's activation maxima: each projection's input channel maxima over calibration text,
measured once per model and calibration text, cached on disk (the smoothing itself is
shards/compress/smoothing.py).

The maxima are those of the fp32 model the stage serves (a raw source, or a prepared artifact's
pruned weights), computed over every layer and the final norm (16 s for the default model, 1
thread) and cached by the weights' fingerprint and the calibration text: a restart, a re-shard
or a recompress reads them in milliseconds.
"""
from __future__ import annotations

import fcntl
import hashlib
import os

import torch

from shards.compress.calibration import CalibrationData, Calibrator
from shards.compress.smoothing import HEAD, SMOOTHED
from shards.model.block import RMSNorm, fp32_block
from shards.model.source import cache_dir


def activation_maxima(source, data=None) -> dict:
    """{layer: {projection: amax [in]}, HEAD: amax [hidden]} of the fp32 model `source` on the
    calibration text `data` (a CalibrationData; None: the serving prompts), from the disk cache
    when there is one."""
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
