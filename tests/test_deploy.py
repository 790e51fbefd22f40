"""Tier 2: deploy/serve.yaml through Ray's own `serve run`, with two data-parallel replicas; the
Serve config's args are validated before anything starts."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from serving.api.client import Client
from serving.config import load
from serving.ingress import free_port
from serving.launch import replica_prefixes
from tests.test_serve import QUESTION

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deploy" / "serve.yaml"


def app_args() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"]


def test_serve_yaml_args_are_valid_and_bad_ones_named():
    from serving.api.app import build_app
    from shards.errors import ShardServeError
    build_app(app_args())
    with pytest.raises(ShardServeError, match=r"shard: Extra inputs are not permitted"):
        build_app({**app_args(), "shard": 2})
    with pytest.raises(ShardServeError, match=r"compression: .*unknown compression 'int9'.*valid: fp32"):
        build_app({**app_args(), "compression": "int9"})
    with pytest.raises(ShardServeError, match=r"device: Input should be 'auto', 'cpu' or 'cuda'"):
        build_app({**app_args(), "device": "tpu"})
    with pytest.raises(ShardServeError, match=r"controller.high_watermark: .*less than or equal to 1"):
        build_app({**app_args(), "controller": {"high_watermark": 1.5}})
    with pytest.raises(ShardServeError, match=r"cache.budgets.0: .*cannot read '300 parsecs'"):
        build_app({**app_args(), "budgets": ["300 parsecs", "1GiB"]})


@pytest.mark.ray
def test_serve_run_yaml_with_two_replicas_both_serve(tmp_path):
    """`serve run` on a copy of deploy/serve.yaml (replicas: 2, a free port, less KV): both
    pipelines load, and both take requests (every shard of each reports steps)."""
    conf = yaml.safe_load(SERVE_YAML.read_text())
    port = free_port("127.0.0.1")
    conf["http_options"]["port"] = port
    conf["applications"][0]["args"].update(replicas=2, kv_tokens=2048, prefix="dep-", compile=False)  # compiled: test_serve
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(conf))
    log = open(tmp_path / "serve-run.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 420
        while not client.healthy():
            assert proc.poll() is None, (tmp_path / "serve-run.log").read_text()[-3000:]
            assert time.time() < deadline, "healthz never became 200"
            time.sleep(1)
        # healthz answered by one replica: wait until the other's pipeline is loaded too (each
        # builds its own at its first request), so the 12 requests can go to either
        both = {}
        while len(both) < 2 or not all(all("error" not in s for s in b["shards"]) for b in both.values()):
            assert time.time() < deadline, f"both replicas never came up: {sorted(both)}"
            try:
                body = client.shards()
            except Exception:   # a replica still building its pipeline (slow answer, or 503)
                time.sleep(1)
                continue
            both[body["replica"]] = body
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: client.chat(QUESTION, max_tokens=12, temperature=0), range(12)))
        assert len(set(replies)) == 1 and replies[0].startswith("The capital of France is")
        seen = {}
        for _ in range(40):   # /v1/shards is answered by either replica
            body = client.shards()
            seen[body["replica"]] = body
            if len(seen) == 2:
                break
        assert sorted(seen) == [0, 1]
        for r, body in seen.items():
            prefix = replica_prefixes(load(conf["applications"][0]["args"]))[r]    # dep-<fingerprint>-r<r>-
            assert [s["name"] for s in body["shards"]] == [f"{prefix}shard-0", f"{prefix}shard-1"]
            assert all(s["steps"] > 0 for s in body["shards"]), body["shards"]
        print("steps per replica:", {r: [s["steps"] for s in b["shards"]] for r, b in seen.items()})
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """`serve run` shuts Serve and its Ray down on SIGINT; its process group is killed after."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_presets_reach_the_shards_as_specs():
    """`fast` (the serve default) is planned as w4a8x2: shards report the spec, and the
    controller's compression ladder, measured on the model, holds it between the lighter and
    the heavier compressions by bytes."""
    from serving.config import load
    from serving.control.policy import ControllerConfig
    from serving.launch import make_plan, measured_ladder
    p = make_plan(load(compression="fast", placement=False))
    assert {s.compression for s in p.shards} == {"w4a8x2"}
    ladder = measured_ladder("default", "w4a8x2")
    ControllerConfig(**ladder)   # lengths agree
    steps, ratio = ladder["ladder"], ladder["ladder_bytes"]
    assert steps[0] == "fp32" and ratio[0] == 1.0 and list(ratio) == sorted(ratio, reverse=True)
    assert "fp32" != steps[-1] and steps.index("w8a16") < steps.index("w4a8x2") < steps.index("nf4")
