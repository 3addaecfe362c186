"""The GPU benchmark script (`benchmarks/train_gpu.py`) on the CPU at tiny sizes, so that it does not
rot between the rare sessions that have a GPU: every subcommand runs, and what it writes loads back.
Also the CLIP edit-kind diagnostic (`benchmarks/clip_edit_auc.py`) on a tiny CLIP, and the position
probe (`benchmarks/position_probe.py`) on a tiny pipeline, the autoencoder ceiling
(`benchmarks/autoencoder_ceiling.py`) and the word-separation diagnostic (`benchmarks/word_separation.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_gpu.py"


def _run(*args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.nightly  # ~4 min of subprocesses: `make test-all` keeps the GPU script from rotting
def test_train_gpu_script_end_to_end_on_cpu(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import make_workdir  # random first-stage models and latents of the demo's shapes

    from ldm.testing import tiny_pipeline_folder

    work = tmp_path / "work"
    make_workdir(work, rows=80, text_len=32, text_dim=128)
    empty = tmp_path / "empty.npy"
    _run("prepare", "--workdir", str(work), "--dest", str(empty))

    out = tmp_path / "out"
    records = _run(
        "run",
        "--tiny",
        "--latents",
        str(work / "data" / "latents"),
        "--empty-embedding",
        str(empty),
        "--out",
        str(out),
    )
    parts = {r["part"]: r for r in records}
    assert parts["device"]["device"] == "cpu"
    assert (
        parts["throughput"]["tflop_per_step"] > 0 and parts["throughput"]["mfu"] is None
    )  # no peak for a CPU
    assert parts["quality"]["steps"] == 12
    assert json.loads((out / "train_gpu.json").read_text()) == records

    # export: the written EMA weights become the U-Net of a pipeline folder that diffusers loads
    weights = out / parts["quality"]["weights"]
    dest = tmp_path / "exported"
    _run(
        "export",
        "--weights",
        str(weights),
        "--template",
        str(tiny_pipeline_folder(tmp_path / "tpl")),
        "--dest",
        str(dest),
    )
    unet = UNet2DConditionModel.from_pretrained(dest / "unet")
    written = load_file(str(weights))
    assert set(written) == set(unet.state_dict())
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, written[name].float())

    ae = _run("autoencoders", "--tiny", "--images", "64", "--out", str(tmp_path / "ae"))
    assert [r["run"] for r in ae] == ["ae_demo", "ae_long", "ae_wide_long"]
    assert all(0.0 <= r["ceiling"]["overall"] <= 1.0 and r["psnr_db"] > 0 for r in ae)
    clips = _run("clips", "--tiny", "--images", "64", "--out", str(tmp_path / "clip"))
    assert [r["run"] for r in clips] == ["clip_demo", "clip_long", "clip_long_patch4"]
    assert all(0.0 <= r[f"auc_{k}"] <= 1.0 for r in clips for k in ("random", "one_attribute", "shape_only"))


def test_clip_edit_auc_script_scores_a_saved_clip(tmp_path):
    from ingest_fixtures import write_tiny_models

    work = write_tiny_models(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "clip_edit_auc.py"), str(work.clip), "--renders", "96"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    figures = dict(part.split()[:2] for part in line.split(": ", 1)[1].split(" | "))
    assert {"position", "shape", "colour"} <= figures.keys()
    assert all(0.0 <= float(auc) <= 1.0 for auc in figures.values())


def test_position_probe_script_reads_a_model_twice_and_finds_the_seed_decides_for_identical_models(tmp_path):
    from ldm.config import dump_config
    from ldm.config.eval import EvalConfig
    from ldm.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "model")
    eval_cfg = dump_config(EvalConfig(num_prompts=24, num_inference_steps=2), tmp_path / "eval.yaml")
    latents = _position_latents(tmp_path / "latents")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "position_probe.py"), "--eval-config", str(eval_cfg),
         "--seeds", "4", "--latents", str(latents), str(folder), str(folder)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ratios = [float(line.split("hidden states ")[1].split()[0]) for line in lines if "  text:" in line]
    assert len(ratios) == 2 and ratios[0] == ratios[1] > 0  # the same text encoder twice
    centroids = [line for line in lines if "first estimate" in line]
    numbers = [float(x) for x in centroids[0].split(": ", 1)[1].replace("(", " ").replace(")", " ").replace(",", " ").split() if x[0].isdigit()]  # fmt: skip
    assert len(numbers) == 10 and all(0 <= x <= 7 for x in numbers)  # 5 places, an 8x8 latent
    placed = [line for line in lines if "absolute-position prompts passed" in line]
    assert len(placed) == 2 and placed[0].endswith("of 2 absolute-position prompts passed")
    uses = [line.split("): ", 1)[1] for line in lines if "caption use (3 rows" in line]
    assert len(uses) == 2 and uses[0] == uses[1] and "place" in uses[0]  # 3 of the 4 rows name a place
    (pair,) = [line for line in lines if line.startswith("same seed, shared cell")]
    same, other = pair.rsplit(": ", 1)[1].split(" of ")[0], pair.rsplit("other seeds ", 1)[1].rstrip(")")
    assert int(same) >= float(other)  # one model against itself: the same seed gives the same picture


def _position_latents(folder: Path) -> Path:
    """An ingested-style latents folder for the tiny pipeline: 4 rows, 3 of them naming a place."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = ["a large red circle in the top left", "a blue square in the center", "a star",
                "a small green triangle in the bottom right"]  # fmt: skip
    latents = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float16)
    table = pa.table({"caption": captions, "latent": pa.FixedShapeTensorArray.from_numpy_ndarray(latents)})
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000-000.parquet")
    return folder


def test_caption_use_is_one_for_a_unet_that_ignores_the_text_and_not_for_one_that_reads_it(tmp_path):
    """position_probe's caption-use ratios: exactly 1.0 when the cross-attention is cut off (the tiny
    U-Net has no other way to the text), away from 1.0 when it is not."""
    import torch

    from ldm.testing import tiny_pipeline

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from position_probe import caption_use

    latents = _position_latents(tmp_path / "latents")
    pipe = tiny_pipeline()
    with torch.no_grad():
        rows, reads = caption_use(pipe, str(latents))
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        _, ignores = caption_use(pipe, str(latents))
    assert rows == 3 and set(reads) == {(800, 1000), (500, 800)}
    assert all(set(band) == {"place", "colour", "empty"} for band in reads.values())
    assert all(ratio == pytest.approx(1.0, abs=1e-9) for band in ignores.values() for ratio in band.values())
    assert all(abs(band["place"] - 1.0) > 1e-6 for band in reads.values())


def test_autoencoder_ceiling_script_tells_a_trained_autoencoder_from_an_untrained_one():
    """benchmarks/autoencoder_ceiling.py: each variant's keys reach its config, and what it prints
    reflects training (60 steps of a tiny autoencoder reconstruct better than 1)."""
    script = str(ROOT / "benchmarks" / "autoencoder_ceiling.py")
    tiny = ["block_out_channels=[8,16,16]", "norm_num_groups=8", "batch_size=8", "lr=0.003"]
    common = ["--images", "256", "--prompts", "12", "--threads", "1"]
    variants = ["--variant", "one_step", "steps=1", *tiny, "--variant", "trained", "steps=60", *tiny]
    proc = subprocess.run(
        [sys.executable, script, *common, *variants, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["variant"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert rows.keys() == {"one_step", "trained"}
    assert rows["trained"]["config"]["steps"] == 60 and rows["trained"]["config"]["block_out_channels"] == [
        8,
        16,
        16,
    ]
    assert rows["trained"]["psnr_db"] > rows["one_step"]["psnr_db"] + 3.0
    assert all(
        0.0 <= row[key] <= 1.0 for row in rows.values() for key in ("overall", "two_object", "color_attr")
    )

    table = subprocess.run(
        [sys.executable, script, *common, "--variant", "one_step", "steps=1", *tiny],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    header, line = table.stdout.strip().splitlines()
    assert header.startswith("variant | train time") and line.startswith("one_step | 1.00 | ")


def test_word_separation_script_tells_an_encoder_that_keeps_the_words_from_one_that_erases_them(tmp_path):
    """benchmarks/word_separation.py: a tiny random encoder tells "top left" from "bottom right" and
    "circle" from "square"; one whose embeddings are zeroed gives every token the same output (1.00)."""
    import torch

    from ldm.first_stage.text_encoder import save_text_encoder
    from ldm.testing import tiny_components

    parts = tiny_components(seed=0, text_len=16)
    save_text_encoder(parts["tokenizer"], parts["text_encoder"], tmp_path / "keeps")
    erased = parts["text_encoder"]
    with torch.no_grad():
        for name, parameter in erased.named_parameters():
            if name.endswith(("token_embedding.weight", "position_embedding.weight")):
                parameter.zero_()  # every token enters as the same vector...
            elif name.endswith("final_layer_norm.bias"):
                parameter.fill_(1.0)  # ...and leaves as the same non-zero one
    save_text_encoder(parts["tokenizer"], erased, tmp_path / "erases")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "word_separation.py"), f"keeps={tmp_path / 'keeps'}",
         f"erases={tmp_path / 'erases'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(row["encoder"], row["pair"]): row for row in map(json.loads, proc.stdout.splitlines())}
    assert len(rows) == 6
    assert all(
        rows["erases", pair]["min"] == pytest.approx(1.0, abs=1e-3) for pair in ("place", "shape", "binding")
    )
    assert all(rows["keeps", pair]["min"] < 0.98 for pair in ("place", "shape", "binding"))  # 0.90-0.96
    assert all(row["min"] <= row["mean"] + 1e-9 for row in rows.values())
