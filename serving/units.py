"""Byte sizes as people write them: 300MiB, 1.5GiB, 512MB, 1048576."""
from __future__ import annotations

import re

from shards.errors import ShardServeError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ShardServeError(f"cannot read {text!r} as a size; write e.g. 300MiB, 1.5GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budgets(text: str | None) -> list[int] | None:
    return None if text is None else [parse_bytes(x) for x in text.split(",")]
