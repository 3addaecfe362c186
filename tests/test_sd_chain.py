"""The Stable Diffusion chain of docs/FINETUNE.md through the real `ldm` CLI, with storage on S3.

Each leg runs the commands the walkthrough shows, with the SHIPPED configs (``configs/sd15-*.yaml``)
shrunk only by ``--set`` (tiny sizes, two steps, CPU): a tiny SD 1.x or SD 2.x (v-prediction) folder
(`tests/sd_fixtures.py`) uploaded to the suite's S3 server (`tests/s3_fixtures.py`) at the path the
configs name, caption-image pairs served by a local HTTP server, then

    ldm ingest (S3 -> S3) -> ldm train (init_from, data and checkpoints on S3) -> resume from the S3
    checkpoint -> StableDiffusionPipeline.from_pretrained(export) -> ldm eval (clip_score, cmmd;
    promotes to champion) -> upload the export -> ldm serve --model s3://... -> one HTTP generate ->
    Ctrl-C (Serve shut down, no replica left holding CPU).

`make test` runs one leg (sd1 LoRA, the most used path, without the resume: CI's time budget); the other
three are nightly (`make test-all`), as is one `ldm retrain` cycle with configs/sd15-retrain.yaml and
everything on S3.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import requests
import s3_fixtures
import torch
from conftest import free_port
from ingest_fixtures import Route, ScriptedServer, encoded, picture, write_tiny_models
from sd_fixtures import IMAGE_SIZE, LATENT_SIZE, TEXT_WIDTH, write_sd_folder
from typer.testing import CliRunner

from ldm import storage
from ldm.contract import MANIFEST_FILE, read_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BUCKET = "ldm-data"  # the bucket the shipped configs name
SD15 = f"s3://{BUCKET}/models/stable-diffusion-v1-5"  # the path configs/sd15-*.yaml name
SD21 = f"s3://{BUCKET}/models/stable-diffusion-2-1"
SD_FOLDER = {"sd1": SD15, "sd2": SD21}
DATASET = {"sd1": f"s3://{BUCKET}/datasets/sd15", "sd2": f"s3://{BUCKET}/datasets/sd21"}
PAIRS = f"s3://{BUCKET}/incoming/pairs.parquet"
CLIP = f"s3://{BUCKET}/models/clip-tiny"
ROWS = 32
MODEL_NAME = {"full": "sd15", "lora": "sd15-lora"}  # model_name of configs/sd15-train-*.yaml
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}
SCHEDULER = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler"}

s3_endpoint = s3_fixtures.s3_endpoint  # the shared moto server fixture (module scope)

# The shrinking: CPU, tiny sizes, a few steps. Everything else is the shipped config.
INGEST_SETS = [
    "image_size=32",
    f"clip={CLIP}",
    "filters.min_side=32",
    "filters.clip_threshold=-1.0",  # a random CLIP scores anything; keep every picture
    "holdout_fraction=0.5",  # keys hash the server's random port: half keeps both sides well filled
    "download.thread_count=4",
    "download.shard_concurrency=1",
    "encode.batch_size=16",
    "encode.concurrency=1",
    "encode.num_gpus=0",
    "encode.num_cpus=0.5",
    "torch_threads=1",
]
TRAIN_SETS = [
    "use_gpu=false",
    "num_workers=1",
    "cpus_per_worker=0.5",
    "torch_threads=1",
    "batch_size=4",
    "max_steps=2",
    "max_minutes=null",
    "warmup_steps=0",
    'mixed_precision="no"',  # quoted: YAML reads a bare no as false
    "checkpoint_every=2",
    "sample_every=100",
    "sample_prompts=[]",
    "system_metrics=false",
]
EVAL_SETS = [
    f"clip={CLIP}",
    "num_prompts=2",
    "num_reference=4",
    "num_inference_steps=2",
    "batch_size=2",
    "gate.floor=-1.0",  # a random CLIP's clip_score is near 0: the chain checks promotion, not quality
]
SERVE_SETS = [
    "dtype=float32",  # the shipped float16 needs a GPU
    "host=127.0.0.1",
    "replica_num_gpus=0",
    "replica_num_cpus=0.1",
    "min_replicas=1",
    "max_replicas=1",
    "torch_threads=1",
    "num_inference_steps=2",
]


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def ldm(*args: str) -> str:
    """``ldm ARGS`` in process (the console script's Typer app); its stdout, or a failure with output."""
    from ldm.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise AssertionError(
            f"ldm {' '.join(args[:1])} exited {result.exit_code}:\n{result.output[-4000:]}"
        ) from result.exception
    return result.stdout


def last_json(stdout: str) -> dict:
    """The summary a job prints last: an indented JSON object (from a line ``{``) or one JSON line."""
    starts = [m.start() for m in re.finditer(r"^\{", stdout, flags=re.MULTILINE)]
    assert starts, stdout[-2000:]
    return json.loads(stdout[starts[-1] :])


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):  # noqa: F811 - s3_endpoint is the fixture above
    """The bucket the configs name: both SD folders, a tiny CLIP scorer and the pairs list; the
    pictures stay on a local HTTP server for the module."""
    import boto3

    root = tmp_path_factory.mktemp("sd-chain")
    with pytest.MonkeyPatch.context() as patch:
        s3_fixtures.use_s3(patch, s3_endpoint, root / "cache")
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        for kind, uri in SD_FOLDER.items():
            storage.upload_folder(write_sd_folder(root / kind, kind), uri)
        storage.upload_folder(write_tiny_models(root / "tiny").clip, CLIP)
        colours = ["red", "green", "blue", "yellow"]
        routes = {f"/p{i}.png": Route(encoded(picture(IMAGE_SIZE * 2, IMAGE_SIZE * 2, seed=i), "PNG"))
                  for i in range(ROWS)}  # fmt: skip
        with ScriptedServer(routes) as server:
            captions = [f"a {colours[i % 4]} picture number {i}" for i in range(ROWS)]
            fs, path = storage.filesystem(PAIRS)
            table = pa.table({"url": [server.base_url + p for p in routes], "caption": captions})
            pq.write_table(table, path, filesystem=fs)
            yield {"root": root, "ingested": {}}


def ingest(bucket: dict, kind: str) -> Path:
    """`ldm ingest` of the pairs with ``kind``'s VAE and text encoder (once per structure); its workdir."""
    if kind in bucket["ingested"]:
        return bucket["ingested"][kind]
    workdir = bucket["root"] / f"work-{kind}"
    folder = ["--set", f"autoencoder={SD21}", "--set", f"text_encoder={SD21}"] if kind == "sd2" else []
    out = ldm("ingest", "--config", str(CONFIGS / "sd15-ingest.yaml"), "--workdir", str(workdir),
              "--input", PAIRS, "--output", DATASET[kind], "--allow-host", "127.0.0.1",
              *folder, *sets(INGEST_SETS))  # fmt: skip
    manifest = read_manifest(storage.join(DATASET[kind], MANIFEST_FILE))
    assert last_json(out)["dataset_digest"] == manifest.dataset_digest
    assert manifest.counts.accepted == ROWS and manifest.latent_shape == [4, LATENT_SIZE, LATENT_SIZE]
    assert manifest.text_embedding_shape == [77, TEXT_WIDTH]
    assert 0 < manifest.split.holdout < ROWS and manifest.split.train + manifest.split.holdout == ROWS
    assert not (workdir / "data").exists()  # the data went to S3
    bucket["ingested"][kind] = workdir
    return workdir


def train(workdir: Path, kind: str, mode: str, *extra: str) -> dict:
    """`ldm train` with the shipped full or LoRA config, data, init_from and checkpoints on S3."""
    per_kind = []  # SD 1.x: the shipped configs' own paths
    if kind == "sd2":
        folder = SD_FOLDER[kind]
        per_kind = [f"data={DATASET[kind]}", f"init_from={folder}", f"autoencoder={folder}",
                    f"text_encoder={folder}", "prediction_type=null"]  # fmt: skip
        # prediction_type: the shipped configs state SD 1.5's epsilon; null takes the folder's
    out = ldm("train", "--config", str(CONFIGS / f"sd15-train-{mode}.yaml"), "--workdir", str(workdir),
              *sets([*per_kind, *TRAIN_SETS, f"run_name={kind}-{mode}", *extra]))  # fmt: skip
    return last_json(out)


def check_export(export: Path, kind: str, mode: str) -> None:
    """The export is a complete pipeline of the source's architecture and objective; for LoRA the base
    weights are untouched and the adapter file loads onto the base with ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    source = StableDiffusionPipeline.from_pretrained(
        storage.materialize(SD_FOLDER[kind]), local_files_only=True
    )
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True, use_safetensors=True)
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.unet.config) == public(source.unet.config)
    if kind == "sd2":
        assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [2, 4]
    assert type(pipe.scheduler).__name__ == SCHEDULER[kind]
    assert pipe.scheduler.config.prediction_type == PREDICTION[kind]
    trained, base = pipe.unet.state_dict(), source.unet.state_dict()
    assert trained.keys() == base.keys()
    attention = [k for k in base if ".attn1.to_q." in k]
    assert attention and any(not torch.equal(trained[k], base[k]) for k in attention)  # weights moved
    if mode == "full":
        assert not torch.equal(trained["conv_in.weight"], base["conv_in.weight"])
        return
    untouched = [k for k in base if not re.search(r"\.to_(q|k|v|out\.0)\.", k)]
    assert all(torch.equal(trained[k], base[k]) for k in untouched)  # only the adapted layers changed
    assert (export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    source.load_lora_weights(export / "lora")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    cond = torch.randn(1, 77, TEXT_WIDTH, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            source.unet(sample, torch.tensor([500]), cond).sample,
            pipe.unet(sample, torch.tensor([500]), cond).sample,
            rtol=1e-4,
            atol=1e-5,
        )


def check_mlflow(workdir: Path, first: dict, resumed: dict | None, kind: str, mode: str) -> None:
    import mlflow

    from ldm.tracking import configure

    configure(workdir)
    client = mlflow.MlflowClient()
    params = client.get_run(first["run_id"]).data.params
    assert params["prediction_type"] == PREDICTION[kind]
    assert params["data.uri"] == DATASET[kind] and params["storage_path"] == f"s3://{BUCKET}/runs"
    trainable, total = int(params["trainable_params"]), int(params["total_params"])
    assert (0 < trainable < total / 10) if mode == "lora" else (trainable == total > 0)
    if resumed is not None:
        history = client.get_metric_history(resumed["run_id"], "resumed_from_step")
        assert [m.value for m in history] == [2.0]


def _sleeping_in_run_serve(thread_id: int) -> bool:
    """Whether ``thread_id`` waits in `serve.app.run_serve`'s Ctrl-C loop (deployed, nothing else to do)."""
    frame = sys._current_frames().get(thread_id)
    return frame is not None and frame.f_code.co_name == "run_serve"


def serve_and_generate(workdir: Path, model: str) -> dict:
    """`ldm serve --model MODEL` until one generate request is answered, then Ctrl-C (as a user would)."""
    from ray import serve

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answered: dict = {}
    stop = threading.Event()
    main_thread = threading.main_thread().ident
    assert main_thread is not None and threading.current_thread().ident == main_thread

    def client() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "status" not in answered:
            try:
                health = requests.get(f"{base}/healthz", timeout=10)
                if health.status_code == 200:
                    answered["healthz"] = health.json()
                    body = {"prompt": "a red picture", "seed": 0, "num_inference_steps": 2}
                    response = requests.post(f"{base}/v1/generate", json=body, timeout=120)
                    answered["status"], answered["body"] = response.status_code, response.json()
            except requests.RequestException as error:
                answered["last_error"] = repr(error)
            time.sleep(1)
        # Ctrl-C only where `ldm serve` waits for it (a signal elsewhere would stop pytest itself)
        while not stop.is_set():
            if _sleeping_in_run_serve(main_thread):
                time.sleep(0.5)
                if _sleeping_in_run_serve(main_thread):
                    signal.pthread_kill(main_thread, signal.SIGINT)
                    return
            time.sleep(0.5)

    # A fresh `ldm serve` process has Python's Ctrl-C handler; Ray Tune (inside `ldm train`, run
    # earlier in this process) leaves its own installed, which only asks a finished Tune run to stop.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        ldm("serve", "--config", str(CONFIGS / "sd15-serve.yaml"), "--workdir", str(workdir),
            "--model", model, "--port", str(port), *sets(SERVE_SETS))  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=30)
        signal.signal(signal.SIGINT, previous)
    assert not serve.status().applications  # nothing left holding a CPU for the next leg
    return answered


CI_LEG = ("sd1", "lora")  # `make test`'s leg: the most used path, without the resume (CI budget)
LEGS = [
    pytest.param(*CI_LEG, id="-".join(CI_LEG)),
    *(
        pytest.param(kind, mode, id=f"{kind}-{mode}", marks=[pytest.mark.slow, pytest.mark.nightly])
        for kind, mode in (("sd1", "full"), ("sd2", "full"), ("sd2", "lora"))
    ),
]


@pytest.mark.parametrize(("kind", "mode"), LEGS)
def test_sd_chain_on_s3(kind, mode, bucket, ray_local):
    import base64
    import io

    from PIL import Image

    from ldm.registry import get_alias_version

    torch.set_num_threads(1)
    started = time.monotonic()
    workdir = ingest(bucket, kind)
    print(f"[{kind}-{mode}] ingest done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    # sd2-lora: two DDP workers, where only the adapter's gradients are synchronised
    ddp = ["num_workers=2"] if (kind, mode) == ("sd2", "lora") else []
    first = train(workdir, kind, mode, *ddp)
    print(f"[{kind}-{mode}] train done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    assert first["steps"] == 2 and first["checkpoint"].startswith(f"{BUCKET}/runs/{kind}-{mode}/")
    assert first["exported_weights"] == ("ema_lora" if mode == "lora" else "ema_unet")
    if ddp:  # the replicas end equal
        assert len(first["replicas"]) == 2 and len({r["sha256"] for r in first["replicas"]}) == 1
    fs, path = storage.filesystem(f"s3://{first['checkpoint']}")
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path))}
    assert ("lora" in names and "unet" not in names) if mode == "lora" else "unet" in names
    check_export(Path(first["export"]), kind, mode)

    final_run = first
    if (kind, mode) != CI_LEG:  # same run_name: resumes from the S3 checkpoint
        final_run = train(workdir, kind, mode, *ddp, "max_steps=3")
        assert final_run["steps"] == 3 and final_run["checkpoint"].startswith(f"{BUCKET}/runs/{kind}-{mode}/")
    check_mlflow(workdir, first, final_run if final_run is not first else None, kind, mode)
    print(f"[{kind}-{mode}] resume done at {time.monotonic() - started:.0f}s", file=sys.stderr)

    name = MODEL_NAME[mode]
    per_model = [f"model=models:/{name}@candidate", f"model_name={name}"] if mode == "lora" else []
    per_kind = [f"data={DATASET[kind]}"] if kind == "sd2" else []
    out = ldm("eval", "--config", str(CONFIGS / "sd15-eval.yaml"), "--workdir", str(workdir),
              *sets([*per_model, *per_kind, *EVAL_SETS]))  # fmt: skip
    final = json.loads(out.strip().splitlines()[-1])
    for key in ("clip_score", "cmmd", "reference.clip_score", "reference.cmmd"):
        assert isinstance(final[key], float), (key, final)
    assert get_alias_version(name, "champion") == str(final_run["model_version"])

    print(f"[{kind}-{mode}] eval done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    model = storage.upload_folder(Path(final_run["export"]), f"s3://{BUCKET}/exports/{kind}-{mode}")
    answered = serve_and_generate(workdir, model)
    print(f"[{kind}-{mode}] serve done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    assert answered.get("status") == 200, answered
    image = Image.open(io.BytesIO(base64.b64decode(answered["body"]["images"][0])))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert answered["healthz"]["model"]["uri"] == model


@pytest.mark.slow
@pytest.mark.nightly  # `make test-all`: a whole cycle (ingest, LoRA fine-tune, eval, gate) on 2 cores
def test_retrain_cycle_on_s3(bucket, ray_local):
    """`ldm retrain --config configs/sd15-retrain.yaml`: source, cycle data, records and checkpoints on S3."""
    torch.set_num_threads(1)
    workdir = bucket["root"] / "work-retrain"
    shrink = [
        *(f"ingest.{value}" for value in [*INGEST_SETS, "allow_hosts=[127.0.0.1]"]),
        *(f"train.{value}" for value in TRAIN_SETS),
        *(f"eval.{value}" for value in EVAL_SETS),
    ]
    args = ["retrain", "--config", str(CONFIGS / "sd15-retrain.yaml"), "--workdir", str(workdir)]
    record = last_json(ldm(*args, *sets(shrink)))
    assert record["status"] == "promoted", record
    assert record["new_shards"] == [PAIRS] and record["rows_accepted"] == ROWS
    assert record["init_from"] == SD15 and record["previous_champion"] is None  # the first cycle
    assert record["champion"] == record["candidate"] == "1" and record["gate_metric"] == "clip_score"
    root = f"s3://{BUCKET}/retrain-sd15"
    stored = json.loads(storage.read_bytes(storage.join(root, "cycles", f"{record['cycle_id']}.json")))
    assert stored["dataset_digest"] == record["dataset_digest"]
    fs, path = storage.filesystem(f"s3://{BUCKET}/runs/retrain-{record['cycle_id']}")
    assert any(i.base_name.startswith("checkpoint_") for i in fs.get_file_info(pafs.FileSelector(path)))
    assert not (workdir / "retrain").exists() and not (workdir / "runs").exists()  # nothing local

    again = last_json(ldm(*args, *sets(shrink)))
    assert again["status"] == "no_new_data"
