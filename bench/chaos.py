"""Chaos run: the faults a cluster has, one after another, under load over HTTP; a timeline.

    .venv/bin/python bench/chaos.py --json bench/results/chaos-run.json

A 3-node `ray.cluster_utils.Cluster` on this host: the head runs Serve's proxy and the two
replicas (a `head` resource pins them), nodes `a` and `b` (the most memory) the shards. The app
serves replicas: 2 x shards: 2 (fp32, eager) and takes the same `--requests` greedy chat requests
at `--concurrency` twice: calm, then while these faults happen in turn, each once the pipeline
is whole again after the one before:
  hang        SIGSTOP on a shard's process for 30 s  -> past its step deadline: pinged, killed, re-placed
  node        node `b` removed                       -> its shards re-placed on the survivors
  replica     a Serve replica's process SIGKILLed    -> its in-flight requests fail; Serve starts another,
                                                        which re-adopts the pipeline's running shards
  controller  a pipeline's controller killed         -> Ray restarts it; it re-adopts the pipeline
  split+patch a budget forces a split; another shard's budget is PATCHed while the split loads
                                                     -> the PATCH waits for the split and is kept
Exit 1 unless: only requests in flight at the replica's kill fail, each with an error body; the
rest equal the calm run's text; at the end every shard holds 0 KV blocks and no shard actor is
alive but the two pipelines' own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx

from serving.stamp import stamp

GiB = 1 << 30
NODE = dict(num_cpus=1, object_store_memory=128 << 20)
CONFIG = {"prefix": "chaos-", "shards": 2, "replicas": 2, "kv_tokens": 2048, "compile": False,
          "compression": "fp32", "max_batch": 32,
          "controller": {"readings": 2, "quiet_s": 5, "relax_s": 3600, "max_shards": 3,
                         "actions": ["move", "split", "recompress"]}}
STOP_S = 30.0           # how long the hung shard stays stopped


class Admin:
    """/v1/shards of either replica (Serve picks one per request)."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=120)

    def both(self, timeout: float = 120.0) -> dict[int, dict]:
        """rank -> /v1/shards body, once both replicas have answered."""
        seen, deadline = {}, time.time() + timeout
        while len(seen) < 2:
            assert time.time() < deadline, f"only replicas {sorted(seen)} answered /v1/shards"
            try:
                r = self.http.get("/v1/shards")
                if r.status_code == 200:
                    seen[r.json()["replica"]] = r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return seen

    def patch(self, name: str, budget: int | None) -> dict:
        """PATCH a shard by name; a 404 means the other replica answered: asked again."""
        for _ in range(200):
            r = self.http.patch(f"/v1/shards/{name}", json={"budget_bytes": budget})
            if r.status_code != 404:
                assert r.status_code == 200, r.text
                return r.json()
        raise AssertionError(f"no replica owns {name}")

    def whole(self, timeout: float = 180.0, check=lambda bodies: True) -> dict[int, dict]:
        """Both pipelines with every shard answering, none down, and `check` true."""
        deadline = time.time() + timeout
        while True:
            bodies = self.both(timeout)
            if all(b["down"] is None and all("error" not in s for s in b["shards"]) for b in bodies.values()) \
                    and check(bodies):
                return bodies
            assert time.time() < deadline, {r: [s.get("error") for s in b["shards"]] for r, b in bodies.items()}
            time.sleep(0.2)


# ---- load ---------------------------------------------------------------------------------------
async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    """Every prompt once, `concurrency` at a time: status, text or error, start and end (epoch s)."""
    sem, out = asyncio.Semaphore(concurrency), [None] * len(prompts)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(i: int) -> None:
            async with sem:
                t0 = time.time()
                body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                        "temperature": 0}
                try:
                    r = await c.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                    text = r.json()["choices"][0]["message"]["content"] if ok else r.text
                    out[i] = {"status": r.status_code, "text" if ok else "error": text}
                except httpx.HTTPError as e:
                    out[i] = {"status": None, "error": f"{type(e).__name__}: {e}"}
                out[i].update(start=t0, end=time.time())
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return out


# ---- faults -------------------------------------------------------------------------------------
def restarts_after(bodies: dict, t: float) -> list[dict]:
    return [e for b in bodies.values() for e in b["events"] if e["action"] == "restart" and e["time"] >= t]


def hang(admin: Admin, **_) -> dict:
    body = admin.both()[0]
    victim = body["shards"][1]
    t0 = time.time()
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        bodies = admin.whole(check=lambda b: b[0]["shards"][1]["pid"] != victim["pid"])
        recovered = time.time() - t0
    finally:
        time.sleep(max(0.0, t0 + STOP_S - time.time()))
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:     # killed as hung, as it should be
            pass
    e = restarts_after(bodies, t0)[0]
    return {"target": victim["name"], "detected_s": e["time"] - t0, "replaced_s": e["seconds"],
            "recovered_s": recovered,
            "reason": e["reason"], "still_alive_after_stop": _alive(victim["pid"])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def node(admin: Admin, cluster, nodes: dict, **_) -> dict:
    gone = nodes["b"].node_id
    on_b = [s["name"] for b in admin.both().values() for s in b["shards"] if s["node_id"] == gone]
    t0 = time.time()
    cluster.remove_node(nodes["b"])
    bodies = admin.whole(check=lambda bs: all(s["node_id"] != gone for b in bs.values() for s in b["shards"]))
    events = restarts_after(bodies, t0)
    return {"target": f"node b ({', '.join(on_b)})",
            "detected_s": min(e["time"] for e in events) - t0 if events else None,
            "recovered_s": time.time() - t0, "reason": events[0]["reason"] if events else None}


def replica(admin: Admin, **_) -> dict:
    before = admin.both()[1]
    t0 = time.time()
    os.kill(before["router_pid"], signal.SIGKILL)
    bodies = admin.whole(check=lambda b: b[1]["router_pid"] != before["router_pid"])
    after = bodies[1]
    return {"target": f"replica 1 (pid {before['router_pid']})", "kill_time": t0, "recovered_s": time.time() - t0,
            "shards_readopted": [s["pid"] for s in after["shards"]] == [s["pid"] for s in before["shards"]]}


def controller(admin: Admin, **_) -> dict:
    """Kill replica 0's pipeline controller: Ray restarts it (a new process), and it polls the
    pipeline again once the router's next sync names it."""
    import ray
    prefix = admin.both()[0]["shards"][0]["name"].rsplit("shard-", 1)[0]
    name = prefix + "controller"

    def status() -> dict:
        try:
            return ray.get(ray.get_actor(name, namespace="shardserve").status.remote(prefix), timeout=5)
        except Exception:      # restarting
            return {}
    old = status().get("pid")
    t0 = time.time()
    ray.kill(ray.get_actor(name, namespace="shardserve"), no_restart=False)
    deadline = time.time() + 120
    while not ((st := status()).get("readings") and st["pid"] != old):
        assert time.time() < deadline, f"{name} never came back and polled its pipeline"
        time.sleep(0.2)
    return {"target": name, "recovered_s": time.time() - t0, "readopted": st["names"]}


def split_patch(admin: Admin, **_) -> dict:
    """Shard 0 of a pipeline over its budget with shard 1 left no room: a split. While the new
    actor loads (its name appears), shard 1's budget is lifted: the PATCH waits for the split
    (one lock) and the plan the split writes keeps it."""
    import ray
    b = admin.both()[0]
    s0, s1 = b["shards"][0], b["shards"][1]
    def used(s: dict) -> int:     # ShardStats.used_bytes: RSS less the runtime
        return s["rss_bytes"] - s["base_rss_bytes"]
    admin.patch(s1["name"], used(s1))
    t0 = time.time()
    admin.patch(s0["name"], int(0.8 * used(s0)))
    prefix, deadline = s0["name"].rsplit("shard-", 1)[0], time.time() + 120
    while not any(a["name"] == f"{prefix}shard-2" for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.time() < deadline, "no split started"
        time.sleep(0.05)
    t_patch = time.time()
    admin.patch(s1["name"], None)       # during the split's load
    patched_s = time.time() - t_patch
    bodies = admin.whole(check=lambda bs: len(bs[0]["shards"]) == 3)
    shards = bodies[0]["shards"]
    k = next(i for i, s in enumerate(shards) if s["name"] == s1["name"])
    kept = shards[k]["budget_bytes"] is None and bodies[0]["plan"]["shards"][k]["budget_bytes"] is None
    for s in shards:
        admin.patch(s["name"], None)
    return {"target": s0["name"], "recovered_s": time.time() - t0, "patch_waited_s": patched_s,
            "patch_kept": kept, "layers": [(s["start"], s["end"]) for s in shards]}


FAULTS = {"hang": hang, "node": node, "replica": replica, "controller": controller, "split+patch": split_patch}


async def faults(admin: Admin, cluster, nodes: dict, t0: float, timeline: list) -> None:
    for name, fault in FAULTS.items():
        started = time.time()
        result = await asyncio.to_thread(fault, admin, cluster=cluster, nodes=nodes)
        timeline.append({"fault": name, "t": started - t0, **result})
        print(f"  {started - t0:6.1f} s  {name:<12} {json.dumps(result, default=str)}", flush=True)


# ---- the run ------------------------------------------------------------------------------------
def start(port: int):
    """The cluster and the app; returns (cluster, nodes, url)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.api.app import ShardServe
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, memory=GiB // 2, include_dashboard=False,
                                                          resources={"head": 1}))
    nodes = {"a": c.add_node(**NODE, memory=4 * GiB), "b": c.add_node(**NODE, memory=4 * GiB)}
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="shardserve", log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = ShardServe.options(num_replicas=2, ray_actor_options={"num_cpus": 0, "resources": {"head": 0.01}})
    serve.run(app.bind(CONFIG), name="shardserve", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    Admin(url).whole(timeout=600)
    return c, nodes, url


async def chaos(url: str, prompts: list[str], args, cluster, nodes: dict) -> tuple[list, list, float]:
    admin, timeline, t0 = Admin(url), [], time.time()
    results = asyncio.ensure_future(load(url, prompts, args.concurrency, args.max_tokens))
    await asyncio.sleep(args.lead_s)         # the load at full concurrency before the first fault
    await faults(admin, cluster, nodes, t0, timeline)
    return await results, timeline, t0


def verdict(calm: list, faulted: list, timeline: list, url: str) -> dict:
    """What the run must show, with the numbers."""
    import ray
    kill = next(f["kill_time"] for f in timeline if f["fault"] == "replica")
    failed = [r for r in faulted if r["status"] != 200]
    admin = Admin(url)
    bodies = admin.whole(check=lambda bs: all(s["kv_blocks_used"] == 0 and s["live_sequences"] == 0
                                              for b in bs.values() for s in b["shards"]))
    ours = {s["name"] for b in bodies.values() for s in b["shards"]}
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "shardserve" and "shard-" in a["name"]}
    pids = {s["pid"] for b in bodies.values() for s in b["shards"]}
    return {"requests": len(faulted), "completed": len(faulted) - len(failed), "failed": len(failed),
            "failed_in_flight_at_replica_kill": sum(r["start"] <= kill <= r["end"] for r in failed),
            "failed_with_error_body": sum(bool(r.get("error")) for r in failed),
            "failed_ended_within_s_of_kill": max((r["end"] - kill for r in failed), default=0.0),
            "equal_to_calm": sum(r.get("text") == c.get("text") for r, c in zip(faulted, calm) if r["status"] == 200),
            "calm_failed": sum(r["status"] != 200 for r in calm),
            "kv_blocks_used": sum(s["kv_blocks_used"] for b in bodies.values() for s in b["shards"]),
            "orphan_actors": sorted(alive - ours), "orphan_processes": sorted(_shard_processes() - pids),
            "errors": sorted({r["error"][:200] for r in failed})}


def _shard_processes() -> set[int]:
    """Pids of every shard actor process on this host (Ray titles them ray::ShardWorker)."""
    import psutil
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith("ray::ShardWorker"):
            out.add(p.pid)
    return out


def passed(v: dict) -> bool:
    return (v["calm_failed"] == 0 and v["failed"] == v["failed_in_flight_at_replica_kill"] == v["failed_with_error_body"]
            and v["equal_to_calm"] == v["completed"] and v["kv_blocks_used"] == 0 and not v["orphan_actors"]
            and not v["orphan_processes"])


def main() -> int:
    import socket

    import ray
    from ray import serve

    from shards.data import read_prompts
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lead-s", type=float, default=10.0, help="seconds of load before the first fault")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = read_prompts(args.requests)
    cluster, nodes, url = start(port)
    try:
        t = time.time()
        calm = asyncio.run(load(url, prompts, args.concurrency, args.max_tokens))
        print(f"calm: {len(calm)} requests in {time.time() - t:.0f} s; faults:", flush=True)
        faulted, timeline, t0 = asyncio.run(chaos(url, prompts, args, cluster, nodes))
        v = verdict(calm, faulted, timeline, url)
        v["seconds"] = max(r["end"] for r in faulted) - t0
    finally:
        from shards.runtime.actor import stop_pipeline
        serve.shutdown()
        stop_pipeline(CONFIG["prefix"])
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(v, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": stamp(), "config": CONFIG, "args": vars(args),
                                               "timeline": timeline, "verdict": v}, indent=1, default=str))
    return 0 if passed(v) else 1


if __name__ == "__main__":
    raise SystemExit(main())
