"""First-stage models: tiny CLIP, autoencoder and text encoder built, trained a few steps, saved, loaded.

Every model here is a few hundred thousand parameters at most and trains for a handful of steps; the
point is the plumbing (formats, loaders, the open_clip <-> transformers mapping, bootstrap reuse and
gates), not quality. The quality gates are measured by running `run_bootstrap` with its defaults.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.config.base import load_config
from ldm.config.bootstrap import AutoencoderConfig, BootstrapConfig, ClipConfig, ParseEncoderConfig
from ldm.contract import WorkDir
from ldm.first_stage import autoencoder as ae
from ldm.first_stage import clip
from ldm.first_stage import text_encoder as te
from ldm.storage import write_bytes
from ldm.synth.render import render_batch
from pipelines.bootstrap import BootstrapGateError, run_bootstrap

torch.set_num_threads(1)  # tiny models: a second thread buys little and suffers most when cores are shared

TINY_CLIP = ClipConfig(
    embed_dim=32, vision_width=32, vision_layers=1, text_width=32, text_layers=2, head_width=16,
    context_length=16, steps=12, batch_size=16, warmup_steps=2, eval_pairs=32,
)  # fmt: skip
TINY_AE = AutoencoderConfig(block_out_channels=(8, 16, 16), norm_num_groups=8, steps=12, batch_size=4, eval_images=8,
                            scaling_images=16)  # fmt: skip


@pytest.fixture(scope="module")
def renders():
    images, captions, scenes = render_batch(48, seed=3)
    return images, captions


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on 127.0.0.1 with one bucket; yields a function that uploads a local folder."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:  # a free port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {
        k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
        Bucket="models"
    )

    def upload(folder, prefix: str) -> str:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            write_bytes(f"s3://models/{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"s3://models/{prefix}"

    yield upload
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _no_pickles(folder) -> None:
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, suffixes


# --- config ---------------------------------------------------------------------------------------
def test_bootstrap_config_round_trip(tmp_path):
    cfg = BootstrapConfig(clip=TINY_CLIP, autoencoder=TINY_AE, min_clip_auc=0.5)
    path = tmp_path / "bootstrap.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(BootstrapConfig, path, sets=["autoencoder.steps=7"])
    assert again.autoencoder.steps == 7
    assert again.model_copy(update={"autoencoder": TINY_AE}) == cfg
    with pytest.raises(ValueError):
        load_config(BootstrapConfig, sets=["clip.stepz=3"])


# --- CLIP -----------------------------------------------------------------------------------------
def test_clip_save_load_round_trip_and_score(tmp_path, renders):
    images, captions = renders
    torch.manual_seed(0)
    bundle = clip.bundle_for(clip.build_clip(TINY_CLIP))
    bundle.model.eval()
    clip.save_clip(bundle, tmp_path / "clip")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == [
        "model.safetensors",
        "open_clip_config.json",
    ]

    loaded = clip.load_clip(str(tmp_path / "clip"))
    scores = clip.clip_score(loaded, images[:8], captions[:8])
    assert scores.dtype == np.float32 and scores.shape == (8,)
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    np.testing.assert_allclose(scores, clip.clip_score(bundle, images[:8], captions[:8]), atol=1e-6)
    assert loaded.tokenizer(["a red circle"]).shape == (1, TINY_CLIP.context_length)

    with pytest.raises(ValueError, match="uint8"):
        clip.clip_score(loaded, images[:2].astype(np.float32), captions[:2])
    with pytest.raises(ValueError, match="captions"):
        clip.clip_score(loaded, images[:2], captions[:3])
    with pytest.raises(FileNotFoundError):
        clip.load_clip(str(tmp_path))


def test_clip_preprocess_resizes_and_crops_other_sizes():
    preprocess = clip.ImagePreprocess(64, clip.DEFAULT_MEAN, clip.DEFAULT_STD)
    wide = np.zeros((2, 32, 96, 3), dtype=np.uint8)
    wide[:, :, 40:56] = 255  # scaled x2 to 64 x 192 and cropped to columns 64..128: white at 16..48
    pixels = preprocess(wide)
    assert pixels.shape == (2, 3, 64, 64)
    unnormalised = pixels * preprocess.std + preprocess.mean
    assert unnormalised[0, :, :, 32].min() > 0.95 and unnormalised[0, :, :, 0].max() < 0.05


def test_clip_production_spec_with_registered_architecture(tmp_path, renders, s3_bucket):
    """``open_clip:ARCH@WEIGHTS``: a registered architecture name and a safetensors file, local and S3."""
    import open_clip
    from safetensors.torch import save_file

    images, captions = renders
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "ldm-test-tiny.json").write_text(json.dumps(clip.clip_model_config(TINY_CLIP)))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(1)
    reference = open_clip.create_model("ldm-test-tiny", output_dict=True).eval()
    weights = tmp_path / "weights" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))

    expected = None
    for spec in (
        f"open_clip:ldm-test-tiny@{weights}",
        f"open_clip:ldm-test-tiny@{s3_bucket(weights.parent, 'prod')}/open_clip_model.safetensors",
    ):
        bundle = clip.load_clip(spec)
        scores = clip.clip_score(bundle, images[:6], captions[:6])
        if expected is None:
            with torch.no_grad():
                tokens = open_clip.get_tokenizer("ldm-test-tiny")(captions[:6])
                image_features = reference.encode_image(bundle.preprocess(images[:6]), normalize=True)
                text_features = reference.encode_text(tokens, normalize=True)
            expected = (image_features * text_features).sum(-1).numpy()
        np.testing.assert_allclose(scores, expected, atol=1e-5)

    with pytest.raises(ValueError, match="ARCH@WEIGHTS"):
        clip.load_clip("open_clip:ldm-test-tiny")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        clip.load_clip(f"open_clip:no-such-arch@{weights}")


def test_clip_training_lowers_the_loss_and_auc_is_measured(renders):
    images, captions = renders
    torch.manual_seed(0)
    bundle = clip.bundle_for(clip.build_clip(TINY_CLIP))
    cfg = TINY_CLIP.model_copy(update={"steps": 30, "lr": 3e-3})
    losses = clip.train_clip(bundle, images, captions, cfg, seed=0, log=lambda _: None)
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert clip.roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.8])) == pytest.approx(0.875)
    auc = clip.matched_vs_mismatched_auc(bundle, images[:16], captions[:16], captions[16:32])
    assert 0.0 <= auc <= 1.0


def test_hard_negatives_are_drawn_per_kind_and_enter_the_image_to_text_softmax(renders):
    from ldm.synth.negatives import hard_negatives_by_kind

    images, captions = renders
    caption = "a small red circle in the top left"
    kinds = hard_negatives_by_kind(caption)  # colour 7, position 7, shape 3, size 1
    text_of = [caption] + [n for group in kinds.values() for n in group]
    index = {text: i for i, text in enumerate(text_of)}
    groups = [[[index[n] for n in group] for group in kinds.values()]]
    drawn = clip._draw_negatives(groups, torch.zeros(400, dtype=torch.long), 2, np.random.default_rng(0))
    assert len(drawn) == 800 and 0 not in drawn.tolist()  # never the row's own caption
    share = {kind: np.isin(drawn.numpy(), [index[n] for n in group]).mean() for kind, group in kinds.items()}
    assert all(0.18 < s < 0.32 for s in share.values()), share  # each kind a quarter, not by list length
    assert (
        clip._draw_negatives(groups, torch.zeros(4, dtype=torch.long), 0, np.random.default_rng(0)).numel()
        == 0
    )

    # At initialisation the logits are about equal, so the first loss is about
    # 0.5 * (log(B + B * k) + log(B)): the hard negatives widen the image-to-text softmax by log(3) / 2
    # (0.55; seeds 0-2 measured 0.52-0.69). Without them in the softmax the two losses would be equal.
    first = {}
    for k in (0, 2):
        torch.manual_seed(0)
        bundle = clip.bundle_for(clip.build_clip(TINY_CLIP))
        cfg = TINY_CLIP.model_copy(update={"steps": 1, "batch_size": 32, "hard_negatives": k})
        first[k] = clip.train_clip(bundle, images, captions, cfg, seed=0, log=lambda _: None)[0]
    assert 0.3 < first[2] - first[0] < 0.9


def test_hard_negative_kinds_are_preferred_checked_and_part_of_the_digest():
    import hashlib

    from ldm.synth.negatives import hard_negatives_by_kind
    from pipelines.bootstrap import _digest

    single = hard_negatives_by_kind("a small red circle in the top left")
    spatial = ("binding", "position", "relation")
    assert clip._preferred_kinds(single, spatial) == [single["position"]]
    # no spatial edit: every kind it has, less held-out captions (evaluation prompts never reach the
    # CLIP, not even as negatives): "a cyan circle" is a held-out prompt one colour from "a red circle"
    from ldm.synth.grammar import heldout_prompts, is_heldout

    plain = hard_negatives_by_kind("a red circle")
    assert "a cyan circle" in heldout_prompts(96) and "a cyan circle" in plain["colour"]
    kept = clip._preferred_kinds(plain, spatial)
    assert [kind for kind, group in plain.items() if any(not is_heldout(n) for n in group)] == [
        "colour",
        "shape",
    ]
    assert kept == [[n for n in group if not is_heldout(n)] for group in plain.values()]
    assert "a cyan circle" not in sum(kept, []) and "a blue circle" in sum(kept, [])
    assert ClipConfig(hard_negative_kinds=["relation", "position"]).hard_negative_kinds == (
        "position",
        "relation",
    )
    with pytest.raises(ValueError, match="unknown hard-negative kinds"):
        ClipConfig(hard_negative_kinds=["colours"])

    # Off, the new keys leave the digest of a CLIP saved before they existed as it was: it is reused.
    cfg = BootstrapConfig()
    before = {k: v for k, v in cfg.clip.to_dict().items() if not k.startswith("hard_negative")}
    keys = {"seed": cfg.seed, "num_train_images": cfg.num_train_images, "clip": before}
    assert _digest(cfg, "clip") == hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    on = cfg.model_copy(update={"clip": cfg.clip.model_copy(update={"hard_negatives": 1})})
    spatial_on = cfg.model_copy(update={"clip": on.clip.model_copy(update={"hard_negative_kinds": spatial})})
    assert len({_digest(cfg, "clip"), _digest(on, "clip"), _digest(spatial_on, "clip")}) == 3


# --- text encoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_text_tower_conversion_matches_open_clip(tmp_path, renders, quick_gelu):
    from open_clip.model import CLIP

    from ldm.text import encode_captions

    _, captions = renders
    torch.manual_seed(0)
    model_cfg = clip.clip_model_config(TINY_CLIP) | {"quick_gelu": quick_gelu}
    clip_model = CLIP(**model_cfg).eval()
    text_model = te.clip_text_tower_to_transformers(clip_model)
    assert text_model.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert te.max_hidden_state_difference(clip_model, text_model, captions[:8] + [""]) < 1e-5

    # the pooled output (hidden state at the first end-of-text) projected = open_clip's text features
    tokenizer = te.build_text_tokenizer(clip_model)
    ids = tokenizer(captions[:4], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = text_model(ids).pooler_output @ clip_model.text_projection
        torch.testing.assert_close(pooled, clip_model.encode_text(ids), atol=1e-5, rtol=1e-5)

    te.save_text_encoder(tokenizer, text_model, tmp_path)
    _no_pickles(tmp_path)
    loaded_tokenizer, loaded = te.load_text_encoder(str(tmp_path))
    assert loaded_tokenizer.model_max_length == TINY_CLIP.context_length
    torch.testing.assert_close(
        encode_captions(loaded_tokenizer, loaded, captions[:3]),
        encode_captions(tokenizer, text_model, captions[:3]),
    )
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        te.load_text_encoder(str(tmp_path / "tokenizer"))


@pytest.mark.parametrize("num_layers", [0, 1])
def test_a_shallower_text_encoder_is_the_first_layers_of_the_tower(renders, num_layers):
    from open_clip.model import CLIP

    _, captions = renders
    torch.manual_seed(0)
    clip_model = CLIP(**clip.clip_model_config(TINY_CLIP)).eval()
    assert len(clip_model.transformer.resblocks) > 1
    text_model = te.clip_text_tower_to_transformers(clip_model, num_layers)
    assert text_model.config.num_hidden_layers == len(text_model.encoder.layers) == num_layers
    assert te.max_hidden_state_difference(clip_model, text_model, captions[:8] + [""]) < 1e-5
    whole = te.clip_text_tower_to_transformers(clip_model)
    assert te.max_hidden_state_difference(clip_model, whole, captions[:8]) < 1e-5
    ids = te.build_text_tokenizer(clip_model)(
        captions[:2], padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert not torch.allclose(text_model(ids)[0], whole(ids)[0], atol=1e-3)
    with pytest.raises(ValueError, match="transformer layers"):
        te.clip_text_tower_to_transformers(clip_model, len(clip_model.transformer.resblocks) + 1)


# --- autoencoder ----------------------------------------------------------------------------------
def test_autoencoder_shapes_save_load_and_layouts(tmp_path, renders, s3_bucket):
    images, _ = renders
    torch.manual_seed(0)
    vae = ae.build_autoencoder(TINY_AE).eval()
    latents = ae.encode_images(vae, images[:5])
    assert latents.shape == (5, 4, 16, 16) and latents.dtype == torch.float32
    decoded = ae.decode_latents(vae, latents)
    assert decoded.shape == (5, 64, 64, 3) and decoded.dtype == np.uint8
    # encode returns the posterior MEAN: deterministic
    torch.testing.assert_close(ae.encode_images(vae, images[:5]), latents)

    factor = ae.latent_scaling_factor(vae, images)
    assert factor == pytest.approx(1.0 / ae.encode_images(vae, images).std().item())
    vae.register_to_config(scaling_factor=factor)
    ae.save_autoencoder(vae, tmp_path / "sd" / "vae")  # Stable Diffusion layout: <pipeline>/vae/
    _no_pickles(tmp_path)
    for spec in (str(tmp_path / "sd" / "vae"), str(tmp_path / "sd"), s3_bucket(tmp_path / "sd", "sd")):
        loaded = ae.load_autoencoder(spec)
        assert loaded.config.scaling_factor == pytest.approx(factor)
        torch.testing.assert_close(ae.encode_images(loaded, images[:5]), latents)

    with pytest.raises(ValueError, match="latents"):
        ae.decode_latents(vae, torch.zeros(1, 3, 16, 16))
    with pytest.raises(FileNotFoundError):
        ae.load_autoencoder(str(tmp_path))


def test_autoencoder_training_lowers_the_loss(renders):
    images, _ = renders
    torch.manual_seed(0)
    vae = ae.build_autoencoder(TINY_AE)
    before = ae.reconstruction_psnr(vae.eval(), images[:8])
    losses = ae.train_autoencoder(
        vae, images, TINY_AE.model_copy(update={"steps": 25, "lr": 3e-3}), log=lambda _: None
    )
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert ae.reconstruction_psnr(vae, images[:8]) > before + 1.0


def test_the_gradient_difference_term_sees_what_pixel_mse_weighs_by_area(renders):
    """A one-pixel-wide line blurred sideways costs pixel MSE by its area, the gradient term by its edges."""
    import hashlib

    from pipelines.bootstrap import _digest

    line = torch.zeros(1, 3, 16, 16)
    line[..., 8] = 1.0  # one column
    blurred = F.avg_pool2d(line, kernel_size=(1, 3), stride=1, padding=(0, 1))  # spread over three columns
    assert ae.gradient_difference(line, line) == 0
    assert ae.gradient_difference(blurred, line) > F.mse_loss(blurred, line)
    # the term trains: the edge-weighted loss is the MSE loss plus a positive term, step for step
    images, _ = renders
    common = TINY_AE.model_copy(update={"steps": 3})
    torch.manual_seed(0)
    plain = ae.train_autoencoder(ae.build_autoencoder(common), images, common, log=lambda _: None)
    torch.manual_seed(0)
    edged_cfg = common.model_copy(update={"edge_loss_weight": 2.0})
    edged = ae.train_autoencoder(ae.build_autoencoder(edged_cfg), images, edged_cfg, log=lambda _: None)
    assert edged[0] > plain[0]

    # Off (0), the key leaves the digest of an autoencoder saved before it existed as it was.
    cfg = BootstrapConfig(autoencoder=AutoencoderConfig(edge_loss_weight=0.0))
    before = {k: v for k, v in cfg.autoencoder.to_dict().items() if k != "edge_loss_weight"}
    keys = {"seed": cfg.seed, "num_train_images": cfg.num_train_images, "autoencoder": before}
    assert (
        _digest(cfg, "autoencoder")
        == hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    )
    on = cfg.model_copy(update={"autoencoder": edged_cfg})
    assert _digest(on, "autoencoder") != _digest(cfg, "autoencoder")


# --- bootstrap job --------------------------------------------------------------------------------
def test_bootstrap_device_is_checked_before_any_work(tmp_path):
    from pydantic import ValidationError

    from ldm.errors import LdmError
    from pipelines.bootstrap import bootstrap_device

    assert bootstrap_device(BootstrapConfig(device="cpu")).type == "cpu"
    assert bootstrap_device(BootstrapConfig()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValidationError, match="device"):
        BootstrapConfig(device="tpu")
    if not torch.cuda.is_available():
        cfg = BootstrapConfig(workdir=str(tmp_path / "work"), device="cuda")
        with pytest.raises(LdmError, match=r"bootstrap.device is 'cuda' but torch sees no CUDA device"):
            run_bootstrap(cfg, log=lambda _: None)
        assert not (tmp_path / "work").exists()  # failed before rendering or writing anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bootstrap_trains_on_the_gpu_and_saves_models_the_cpu_loads(tmp_path):
    cfg = BootstrapConfig(workdir=str(tmp_path / "work"), num_train_images=64, clip=TINY_CLIP, autoencoder=TINY_AE,
                          min_clip_auc=0.0, min_psnr_db=0.0, device="cuda")  # fmt: skip
    result = run_bootstrap(cfg, log=lambda _: None)
    assert result["clip"]["device"] == result["autoencoder"]["device"] == "cuda"
    assert result["text_encoder"]["max_abs_difference"] < 1e-5
    work = WorkDir(cfg.workdir)
    vae = ae.load_autoencoder(str(work.autoencoder))
    assert vae.device.type == "cpu" and vae.config.scaling_factor == pytest.approx(
        result["autoencoder"]["scaling_factor"]
    )
    assert clip.load_clip(str(work.clip)).device.type == "cpu"


@pytest.mark.slow  # four bootstraps and their MLflow runs: ~90 s on 2 busy cores
def test_bootstrap_writes_reuses_and_gates(tmp_path):
    cfg = BootstrapConfig(workdir=str(tmp_path / "work"), num_train_images=64, clip=TINY_CLIP, autoencoder=TINY_AE,
                          min_clip_auc=0.0, min_psnr_db=0.0, threads=1)  # fmt: skip
    messages: list[str] = []
    result = run_bootstrap(cfg, log=messages.append)
    work = WorkDir(cfg.workdir)
    assert (
        result["clip"]["trained"] and result["autoencoder"]["trained"] and result["text_encoder"]["trained"]
    )
    assert result["clip"]["loss_last"] < result["clip"]["loss_first"]
    assert result["autoencoder"]["loss_last"] < result["autoencoder"]["loss_first"]
    assert 0.0 <= result["clip"]["roc_auc"] <= 1.0 and result["autoencoder"]["psnr_db"] > 0
    assert 0.0 <= result["clip"]["hard_negative_auc"] <= 1.0  # against one-attribute edits of each caption
    assert result["text_encoder"]["max_abs_difference"] < 1e-5
    for folder in (work.clip, work.autoencoder, work.text_encoder):
        assert json.loads((folder / "metrics.json").read_text())["digest"]
    assert any("[clip] step" in m for m in messages) and any("PSNR" in m for m in messages)
    _no_pickles(work.models)

    # the loaders others use read what bootstrap wrote
    vae = ae.load_autoencoder(str(work.autoencoder))
    assert vae.config.scaling_factor == pytest.approx(result["autoencoder"]["scaling_factor"])
    tokenizer, text_model = te.load_text_encoder(str(work.models))
    assert text_model.config.max_position_embeddings == tokenizer.model_max_length == TINY_CLIP.context_length
    assert clip.load_clip(str(work.clip)).model_cfg == clip.clip_model_config(TINY_CLIP)

    assert result["clip"]["device"] == result["autoencoder"]["device"] == "cpu"

    # same config again: nothing retrains, and the device is not part of what a model depends on
    started = time.perf_counter()
    again = run_bootstrap(cfg.model_copy(update={"device": "cpu"}), log=lambda _: None)
    assert not (
        again["clip"]["trained"] or again["autoencoder"]["trained"] or again["text_encoder"]["trained"]
    )
    assert again["clip"]["roc_auc"] == result["clip"]["roc_auc"]
    assert time.perf_counter() - started < 10

    # a gate above the figure fails with a message naming the figure and the threshold
    with pytest.raises(BootstrapGateError, match=r"PSNR.*below the gate 99"):
        run_bootstrap(cfg.model_copy(update={"min_psnr_db": 99.0}), log=lambda _: None)

    # a changed autoencoder section retrains the autoencoder only
    changed = cfg.model_copy(update={"autoencoder": TINY_AE.model_copy(update={"steps": 5})})
    third = run_bootstrap(changed, log=lambda _: None)
    assert third["autoencoder"]["trained"] and not third["clip"]["trained"]

    # every bootstrap is an MLflow run: gate figures, gate verdicts, the reconstruction grid
    from mlflow import MlflowClient

    from ldm import tracking

    tracking.configure(work.root)
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("bootstrap").experiment_id], order_by=["attributes.start_time ASC"]
    )
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    first, failed = runs[0], runs[2]
    assert first.data.metrics["clip.roc_auc"] == pytest.approx(result["clip"]["roc_auc"])
    assert first.data.metrics["autoencoder.psnr_db"] == pytest.approx(result["autoencoder"]["psnr_db"])
    assert first.data.tags["clip.trained"] == "true" and runs[1].data.tags["clip.trained"] == "false"
    assert failed.data.tags["autoencoder.gate"] == "failed" and failed.data.params["min_psnr_db"] == "99.0"
    artifacts = [a.path for a in client.list_artifacts(first.info.run_id)]
    assert "reconstructions.png" in artifacts

    # text_encoder_layers re-converts the text tower alone (the CLIP and the autoencoder are reused)
    shallow = run_bootstrap(changed.model_copy(update={"text_encoder_layers": 0}), log=lambda _: None)
    assert shallow["text_encoder"]["trained"] and not (
        shallow["clip"]["trained"] or shallow["autoencoder"]["trained"]
    )
    assert shallow["text_encoder"]["max_abs_difference"] < 1e-5
    embeddings = te.load_text_encoder(str(work.models))[1]
    assert embeddings.config.num_hidden_layers == 0

    # parse_encoder trains new layers on those embeddings, the text encoder alone again; its held-out
    # parse accuracy goes to metrics.json and MLflow
    parse = ParseEncoderConfig(layers=1, steps=5, batch_size=8)
    parsed = run_bootstrap(shallow_cfg := changed.model_copy(update={"text_encoder_layers": 0, "parse_encoder": parse}),
                           log=messages.append)  # fmt: skip
    assert parsed["text_encoder"]["trained"] and not (
        parsed["clip"]["trained"] or parsed["autoencoder"]["trained"]
    )
    assert (
        0.0 <= parsed["text_encoder"]["parse_exact"] <= 1.0
        and parsed["text_encoder"]["parse_heldout_captions"] > 300
    )
    assert any(m.startswith("[parse encoder] 1 layers, held-out captions parsed exactly") for m in messages)
    parse_model = te.load_text_encoder(str(work.models))[1]
    assert parse_model.config.num_hidden_layers == 1
    token_table = "embeddings.token_embedding.weight"
    assert torch.equal(parse_model.state_dict()[token_table], embeddings.state_dict()[token_table])
    assert not run_bootstrap(shallow_cfg, log=lambda _: None)["text_encoder"]["trained"]  # reused
    last = client.search_runs([runs[0].info.experiment_id], order_by=["attributes.start_time DESC"])[1]
    assert last.data.metrics["text_encoder.parse_exact"] == pytest.approx(
        parsed["text_encoder"]["parse_exact"]
    )
