"""`ldm submit` and `ldm jobs` against a real Ray head with token authentication, on 127.0.0.1.

The head is a `ray start --head --block` child process in its own process group, with a freshly
generated token; the test kills exactly that group at the end (never `ray stop`, which would stop
every Ray on the machine). The client runs the real console scripts in a subprocess with the token in
its environment and the venv's ``bin/`` first on PATH, as an operator's activated shell would: the
ingest goes through Ray's own ``ray job submit -- <entrypoint of infra/k8s/rayjob-ingest.yaml>``,
the training through ``ldm submit``, and ``ldm jobs`` finds the head through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from ops_fixtures import render_shard, tiny_ingest, tiny_train

from ldm.config import dump_config
from ldm.config.ingest import IngestConfig
from ldm.contract import MANIFEST_FILE
from pipelines.submit import entrypoint

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra" / "k8s"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
    path = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": path,
    }


def _start_head(token: str, temp_dir: str) -> tuple[subprocess.Popen, str, object]:
    """`ray start --head --block` on fresh ports; returns (process, dashboard address, log file)."""
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats"]
    command += ["--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir]
    command += [str(item) for pair in ports.items() for item in pair]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 - closed by the fixture
    head = subprocess.Popen(
        command, env=_client_env(token), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return head, f"http://127.0.0.1:{dashboard_port}", log


def _stop(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)  # exactly the group this test started
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _up(head: subprocess.Popen, address: str, temp_dir: str) -> bool:
    """Wait until the head is fully started: the dashboard answers (401 without a token) and
    `ray start` has printed "Ray runtime started" (the dashboard can answer before the node has
    registered, and a node that registers too slowly on busy cores makes `ray start` give up)."""
    deadline = time.monotonic() + 120
    while head.poll() is None and time.monotonic() < deadline:
        try:
            dashboard = requests.get(f"{address}/api/version", timeout=2).status_code == 401
        except requests.ConnectionError:
            dashboard = False
        if dashboard and "Ray runtime started" in (Path(temp_dir) / "head.log").read_text(errors="replace"):
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def ray_head():
    """A token-protected Ray head on 127.0.0.1; yields (dashboard address, token).

    On two busy cores `ray start` sometimes gives up after its fixed 30 s wait for the raylet; the
    fixture then tries once more with fresh ports before it fails.
    """
    token = secrets.token_hex(32)
    for attempt in range(2):
        # Ray's socket paths must stay under ~107 characters: a short private temp dir, not tmp_path.
        temp_dir = tempfile.mkdtemp(prefix="ldmray-")
        head, address, log = _start_head(token, temp_dir)
        try:
            if _up(head, address, temp_dir):
                yield address, token
                return
            if attempt == 1:
                raise RuntimeError(f"ray head did not come up:\n{(Path(temp_dir) / 'head.log').read_text()}")
        finally:
            _stop(head)
            log.close()  # type: ignore[attr-defined]
            shutil.rmtree(temp_dir, ignore_errors=True)


def _ldm(*args: str, token: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return _run([str(BIN / "ldm"), *args], token=token, timeout=timeout, **env)


def _run(argv: list[str], token: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        env=_client_env(token) | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_entrypoint_ships_the_checked_config_as_overrides():
    cfg = IngestConfig(workdir="/w", input="/in.parquet", allow_hosts=["a", "b"])
    command = entrypoint("ingest", cfg, python="/venv/bin/python")
    assert command.startswith("/venv/bin/python -m ldm.cli ingest ")
    assert '--set \'allow_hosts=["a", "b"]\'' in command and "--set 'input=\"/in.parquet\"'" in command
    assert "output=" not in command  # None fields stay at the job's defaults


@pytest.mark.slow  # a Ray head and two jobs: ~1.5-2 minutes on 2 busy cores
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_submit_ingest_and_train_to_a_token_protected_head(ray_head, tmp_path):
    from ingest_fixtures import write_tiny_models
    from mlflow import MlflowClient

    from ldm import tracking
    from ldm.synth.server import ImageServer
    from ldm.synth.source import write_pairs

    address, token = ray_head
    work = write_tiny_models(tmp_path / "work")
    outputs: list[str] = []

    with ImageServer(render_shard(tmp_path / "synth", seed=0, num_pairs=10)) as server:
        pairs = write_pairs(tmp_path / "synth", server.base_url)
        ingest_yaml = dump_config(tiny_ingest(work.root, input=str(pairs)), tmp_path / "ingest.yaml")
        # Ray's own CLI with the RayJob manifest's entrypoint, its config path pointed at ours.
        manifest_entrypoint = yaml.safe_load((INFRA / "rayjob-ingest.yaml").read_text())["spec"]["entrypoint"]
        assert manifest_entrypoint == "ldm ingest --config /etc/ldm/ingest.yaml"
        command = manifest_entrypoint.replace("/etc/ldm/ingest.yaml", str(ingest_yaml))
        done = _run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "t-ingest", "--",
             *command.split()], token=token, timeout=900,
        )  # fmt: skip
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    manifest = json.loads((work.data / MANIFEST_FILE).read_text())
    assert manifest["counts"]["input"] == 10 and manifest["counts"]["accepted"] == 9  # one dead URL

    train_yaml = dump_config(tiny_train(work.root, run_name="submitted"), tmp_path / "train.yaml")
    done = _ldm(
        "submit", "train", "--address", address, "--config", str(train_yaml),
        "--python", sys.executable, "--submission-id", "t-train", "--entrypoint-num-cpus", "0.1",
        "--wait", token=token,
    )  # fmt: skip
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "t-train: SUCCEEDED" in done.stdout

    # no --address: RAY_ADDRESS, as Ray's own CLIs read it
    listed = _ldm("jobs", "list", token=token, RAY_ADDRESS=address)
    status = _ldm("jobs", "status", "t-train", "--address", address, token=token)
    outputs += [listed.stdout, listed.stderr, status.stdout, status.stderr]
    jobs = {
        json.loads(line)["submission_id"]: json.loads(line)["status"] for line in listed.stdout.splitlines()
    }
    assert jobs == {"t-ingest": "SUCCEEDED", "t-train": "SUCCEEDED"}
    assert status.stdout.strip() == "SUCCEEDED"

    # The jobs logged to the work directory's MLflow: one ingest run, one train run with a model.
    tracking.configure(work.root)
    client = MlflowClient()
    runs = {
        name: client.search_runs([client.get_experiment_by_name(name).experiment_id])
        for name in ("ingest", "train")
    }
    assert [r.info.status for r in runs["ingest"]] == ["FINISHED"]
    assert runs["ingest"][0].data.metrics["accepted_rows"] == 9
    (train_run,) = runs["train"]
    assert train_run.info.status == "FINISHED" and train_run.info.run_name == "submitted"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [1, 2, 3]
    assert client.get_model_version_by_alias("ldm", "candidate").run_id == train_run.info.run_id

    # A wrong token: one clear line, exit 2, nothing submitted; no token printed anywhere.
    wrong = "0" * 64
    refused = _ldm("submit", "ingest", "--address", address, "--workdir", str(work.root), token=wrong)
    assert refused.returncode == 2
    assert "refused the request" in refused.stderr and "invalid" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    assert wrong not in refused.stderr
    assert all(token not in text for text in outputs)


def _serve(*args: str, token: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run([str(BIN / "serve"), *args], token=token, timeout=timeout)


@pytest.mark.nightly  # a Ray head and a Serve application: ~80 s (`make test-all`, as `ray job submit`)
def test_serve_deploy_the_shipped_config_to_a_token_protected_head(ray_head, tmp_path):
    """Ray's own `serve deploy` / `serve status` / `serve shutdown` with the shipped config file,
    edited as docs/OPERATIONS.md tells an operator to (model, port, one replica), against the head."""
    from ldm.testing import tiny_pipeline_folder

    address, token = ray_head
    config = yaml.safe_load((REPO / "infra" / "serve" / "serve-config.yaml").read_text())
    port = _free_port()
    config["http_options"] |= {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"] |= {"model": str(tiny_pipeline_folder(tmp_path / "tiny")), "workdir": str(tmp_path)}
    app["args"] |= {"num_inference_steps": 2}
    (generator,) = app["deployments"]
    generator["autoscaling_config"] |= {"max_replicas": 1}
    generator["ray_actor_options"] |= {"num_cpus": 0.1}
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))

    deployed = _serve("deploy", str(path), "--address", address, token=token)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    try:
        deadline = time.monotonic() + 300
        while True:
            status = _serve("status", "--address", address, token=token)
            assert status.returncode == 0, status.stderr[-3000:]
            app_status = yaml.safe_load(status.stdout)["applications"].get("ldm", {})
            if app_status.get("status") == "RUNNING":
                break
            assert app_status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status.stdout
            assert time.monotonic() < deadline, status.stdout
            time.sleep(2)
        assert set(app_status["deployments"]) == {"Ingress", "Generator"}
        assert app_status["deployments"]["Generator"]["replica_states"] == {"RUNNING": 1}

        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
        reply = requests.post(
            f"{url}/v1/generate",
            json={"prompt": "a red circle"},
            headers={"Accept": "image/png"},
            timeout=120,
        )
        assert reply.status_code == 200 and reply.content.startswith(b"\x89PNG"), reply.text[:500]
        bad = requests.post(f"{url}/v1/generate", json={"prompt": "a red circle", "width": 33}, timeout=60)
        assert bad.status_code == 422 and "width" in bad.text
    finally:
        stopped = _serve("shutdown", "--address", address, "--yes", token=token)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
