"""Ray's own `serve run` with the shipped serve config: it deploys, and a deployments[] override wins.

The test edits a copy of ``infra/serve/serve-config.yaml`` as an operator would (model, port, and the
model deployment's queue in its ``deployments:`` section) and runs it through Ray's ``serve run``
command (in-process, non-blocking, on the session's private local Ray).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml
from conftest import free_port

from ldm.testing import tiny_pipeline_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def served(ray_local, tmp_path):
    from ray import serve
    from ray.serve.scripts import run as serve_run

    torch.set_num_threads(1)
    config = yaml.safe_load((REPO / "infra" / "serve" / "serve-config.yaml").read_text())
    port = free_port()
    config["http_options"] |= {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"] |= {"model": str(tiny_pipeline_folder(tmp_path / "tiny")), "workdir": str(tmp_path)}
    app["args"] |= {"num_inference_steps": 30, "max_batch_size": 1}
    (generator,) = app["deployments"]
    # The override under test: one request at a time, one waiting (the shipped file: 4 and 8).
    # (Ray refuses 0: a queue limit is -1, unlimited, or positive.)
    generator |= {"max_ongoing_requests": 1, "max_queued_requests": 1}
    generator["autoscaling_config"] |= {"max_replicas": 1}
    generator["ray_actor_options"] |= {"num_cpus": 0.1}
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_run.main([str(path), "--non-blocking"], standalone_mode=False)
    url = f"http://127.0.0.1:{port}"
    import time

    deadline = time.monotonic() + 120
    while (
        serve.status().applications.get("ldm") is None
        or serve.status().applications["ldm"].status != "RUNNING"
    ):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    yield url
    serve.shutdown()


def test_serve_run_with_the_shipped_config_applies_a_deployments_override(served):
    from ray import serve

    assert requests.get(f"{served}/healthz", timeout=30).json()["status"] == "ok"
    status = serve.status().applications["ldm"]
    assert status.deployments["Generator"].replica_states.get("RUNNING") == 1
    body = {"prompt": "a red circle"}
    with ThreadPoolExecutor(6) as pool:
        codes = list(
            pool.map(
                lambda _: requests.post(f"{served}/v1/generate", json=body, timeout=120).status_code, range(6)
            )
        )
    # capacity 1 running + 1 queued: the rest are shed at once (the shipped 4 + 8 would take all 6)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert requests.post(f"{served}/v1/generate", json=body, timeout=120).status_code == 200
