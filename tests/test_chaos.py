"""Slow: the chaos run (bench/chaos.py): a hung shard, a lost node, a killed Serve replica, a
killed controller and a budget PATCHed during a split, in turn, under 300 requests at c=32 on
2 replicas x 2 shards of a 3-node cluster."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]


def test_chaos_run(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "chaos.py"), "--json", str(out)], cwd=ROOT,
                            start_new_session=True)
    try:
        assert proc.wait(timeout=1800) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run = json.loads(out.read_text())
    v, faults = run["verdict"], {f["fault"]: f for f in run["timeline"]}
    assert list(faults) == ["hang", "node", "replica", "controller", "split+patch"]
    assert v["completed"] + v["failed"] == 300 and v["equal_to_calm"] == v["completed"]
    assert v["failed"] == v["failed_in_flight_at_replica_kill"] == v["failed_with_error_body"]
    assert v["failed_ended_within_s_of_kill"] < 30      # an error, never a hang
    assert v["kv_blocks_used"] == 0 and not v["orphan_actors"] and not v["orphan_processes"]
    assert faults["hang"]["detected_s"] < 15 and faults["replica"]["shards_readopted"]
    assert faults["split+patch"]["patch_kept"] and len(faults["split+patch"]["layers"]) == 3
