"""WikiText-2 perplexity as docs/benchmarks.md ("Protocols") defines it: one row per line (whitespace-only lines become
""), rows joined with "\\n\\n", tokenized once, non-overlapping windows of `seqlen` tokens, no
BOS per window, ppl = exp(mean NLL over every predicted token)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from shards.data import WIKITEXT as DEFAULT_TEXT
from shards.data import wikitext_ids


@dataclass
class EvalResult:
    ppl: float
    seqlen: int
    windows: int
    tokens: int                 # predicted tokens the mean is over
    weight_bytes: int           # measured resident bytes of the compressed model
    compression: str

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(source, compression: str = "fp32", seqlen: int = 2048, windows: int | None = None,
               path: str | os.PathLike = DEFAULT_TEXT, progress: bool = False, calibration=None) -> EvalResult:
    """calibration: a CalibrationData (default: the serving prompts); the evaluated windows are
    skipped when it is this text."""
    import torch
    from tqdm import tqdm

    from shards.compress.calibration import held_out
    from shards.model.generator import Generator
    ids = wikitext_ids(source.tokenizer(), path)
    total = len(ids) // seqlen
    windows = min(windows or total, total)
    calibration = calibration and held_out(calibration, path, windows * seqlen)
    gen = Generator(source, 1, kv_blocks=-(-seqlen // 16), compression=compression, calibration=calibration)
    nll, count = 0.0, 0
    for w in tqdm(range(windows), desc=f"ppl {compression}", disable=not progress):
        chunk = ids[w * seqlen:(w + 1) * seqlen]
        logits = gen.logits(chunk)                        # [seqlen, vocab] fp32
        target = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += len(chunk) - 1
    return EvalResult(math.exp(nll / count), seqlen, windows, count,
                      gen.stages[0].weight_bytes(), gen.stages[0].compression.spec)
