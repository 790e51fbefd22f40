"""Tier 1: the app's /metrics page merges the shardserve families of several Ray nodes' pages."""
import pytest

from serving.api.prometheus import merge

pytestmark = pytest.mark.unit

NODE_A = """# HELP ray_shardserve_shard_step_seconds one step's compute
# TYPE ray_shardserve_shard_step_seconds histogram
ray_shardserve_shard_step_seconds_bucket{shard="s0",le="0.01"} 3.0
ray_shardserve_shard_step_seconds_sum{shard="s0"} 0.02
ray_shardserve_shard_step_seconds_count{shard="s0"} 3.0
# HELP ray_node_cpu_utilization cpu
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="1"} 50.0
"""
NODE_B = """# HELP ray_shardserve_shard_step_seconds one step's compute
# TYPE ray_shardserve_shard_step_seconds histogram
ray_shardserve_shard_step_seconds_bucket{shard="s1",le="0.01"} 1.0
# HELP ray_shardserve_requests_running requests holding KV
# TYPE ray_shardserve_requests_running gauge
ray_shardserve_requests_running{pipeline="p"} 2.0
"""


def test_families_merge_once_with_every_nodes_samples_and_others_are_dropped():
    lines = merge([NODE_A, NODE_B]).splitlines()
    assert not any("cpu_utilization" in x for x in lines)
    assert sum(x.startswith("# HELP ray_shardserve_shard_step_seconds") for x in lines) == 1
    i = lines.index("# TYPE ray_shardserve_shard_step_seconds histogram")
    assert lines[i - 1].startswith("# HELP ray_shardserve_shard_step_seconds")
    step = [x for x in lines if x.startswith("ray_shardserve_shard_step_seconds")]
    assert len(step) == 4 and lines.index(step[0]) > i and 's1' in step[-1]     # node B's after node A's
    assert lines[-1] == 'ray_shardserve_requests_running{pipeline="p"} 2.0'
    assert merge([]) == ""
