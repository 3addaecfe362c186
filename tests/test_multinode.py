"""`ldm train` across two Ray nodes: DDP over gloo between nodes, weights identical on both ranks.

The cluster (``ray.cluster_utils.Cluster``: a head and a second node on 127.0.0.1) runs
in a subprocess, so it neither joins nor disturbs the session's local Ray; the subprocess stops
exactly the nodes it started. ``placement_strategy="STRICT_SPREAD"`` puts one worker on each node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_train import tiny_unet_config, write_tiny_workdir

from ldm.config.train import TrainConfig

CLUSTER_SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster

# Two logical CPUs per node: half for the training worker, the rest for Ray Data's read tasks,
# which ask for a whole CPU each (with one CPU per node they would wait forever, docs/TRAPS.md).
node = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
try:
    cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False)
    from ldm.config.train import TrainConfig
    from pipelines.train import run_train

    summary = run_train(TrainConfig.model_validate_json(sys.argv[1]))
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"summary": summary, "nodes": nodes}, default=str), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_two_nodes_one_worker_each_end_with_identical_weights(tmp_path):
    work = write_tiny_workdir(tmp_path / "work", rows=32)
    cfg = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        num_workers=2,
        cpus_per_worker=0.5,
        placement_strategy="STRICT_SPREAD",
        batch_size=8,
        max_steps=4,
        max_minutes=None,
        checkpoint_every=100,
        sample_prompts=[],
        system_metrics=False,
        run_name="two-nodes",
    )
    env = {
        key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    # ray.init rewrites 127.0.0.1 to the machine's own IP (to be reachable from other hosts) unless
    # this flag says "single-host cluster"; with it, every node and the driver stay on loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, cfg.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: on timeout we stop exactly what it started
    )
    try:
        output, _ = process.communicate(
            timeout=480
        )  # a limit, not a timing check: registration runs the pyfunc once
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"2-node training timed out:\n{output[-3000:]}")
    results = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and results, output[-3000:]
    result = json.loads(results[-1][len("RESULT ") :])
    summary = result["summary"]

    assert summary["steps"] == 4
    replicas = summary["replicas"]
    assert sorted(r["rank"] for r in replicas) == [0, 1]
    assert len(result["nodes"]) == 2
    assert sorted(r["node"] for r in replicas) == result["nodes"]  # one worker on each node
    assert replicas[0]["sha256"] == replicas[1]["sha256"]  # DDP kept the replicas identical
