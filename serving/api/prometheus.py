"""The app's `/metrics`: the shardserve series of every node's Ray metrics agent, in one
Prometheus text page. The series are recorded through Ray's metrics (serving/router/metrics.py,
shards/runtime/metrics.py), so a Prometheus that scrapes the Ray nodes already has them; this
route serves them where a deployment is scraped by its HTTP endpoint alone."""
from __future__ import annotations

import asyncio

PREFIX = "ray_shardserve_"
SCRAPE_TIMEOUT_S = 5.0


def merge(pages: list[str], prefix: str = PREFIX) -> str:
    """The families whose names start with `prefix` from several exposition pages, each
    family's HELP and TYPE once and its samples from every page together."""
    families: dict[str, list[str]] = {}
    for page in pages:
        for line in page.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                if name.startswith(prefix):
                    head = families.setdefault(name, [])
                    if not any(x.startswith(line[:7]) for x in head[:2]):
                        head.insert(0 if line.startswith("# HELP") else min(1, len(head)), line)
            elif line.startswith(prefix):
                family = _family(line.split("{", 1)[0].split(" ", 1)[0], families)
                families.setdefault(family, []).append(line)
    return "".join(line + "\n" for lines in families.values() for line in lines)


def _family(sample: str, families: dict) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if sample.endswith(suffix) and sample[:-len(suffix)] in families:
            return sample[:-len(suffix)]
    return sample


async def scrape() -> str:
    """Every alive Ray node's metrics page, merged (a node that does not answer is left out)."""
    import httpx
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]

    async def one(client, n) -> str:
        try:
            r = await client.get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics")
            return r.text if r.status_code == 200 else ""
        except httpx.HTTPError:
            return ""
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
        pages = await asyncio.gather(*(one(client, n) for n in nodes))
    return merge(list(pages))
