"""The code-based detector and the GenEval-style rules, on real renders of the synthetic grammar."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm.evaluation import Detection, check, detect_objects, judge, score
from ldm.evaluation.geneval import CLUTTER_LIMIT, MIN_SHAPE_IOU
from ldm.synth import (
    BACKGROUND,
    CATEGORIES,
    Scene,
    SceneObject,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render_scene,
    sample_scene,
    scene_for_prompt,
)
from ldm.synth.grammar import SIZE_RADIUS
from ldm.synth.render import shape_centroid_offset


def _signature(objects) -> list[tuple[str, str, str]]:
    return sorted((o.color, o.shape, o.size) for o in objects)


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]


def test_detector_is_exact_on_clean_renders():
    for scene in _scenes(300, seed=11):
        detections = detect_objects(render_scene(scene))
        assert _signature(detections) == _signature(scene.objects), scene
        for obj in scene.objects:
            centroid_y = obj.cy + shape_centroid_offset(obj.shape, SIZE_RADIUS[obj.size])
            assert min(abs(d.cx - obj.cx) + abs(d.cy - centroid_y) for d in detections) < 1.5


def test_detector_works_at_other_resolutions():
    for scene in _scenes(30, seed=12):
        detections = detect_objects(render_scene(scene, size=128))
        assert _signature(detections) == _signature(scene.objects)
        assert all(0 <= d.cx < 64 and 0 <= d.cy < 64 for d in detections)  # reference units


def test_detector_tolerates_blur_and_noise():
    rng = np.random.default_rng(13)
    scenes = _scenes(300, seed=13)
    correct = 0
    for scene in scenes:
        pixels = np.asarray(render_scene(scene), dtype=np.float32)
        pixels = ndimage.gaussian_filter(pixels, (1.0, 1.0, 0)) + rng.normal(0, 8, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        correct += _signature(detect_objects(image)) == _signature(scene.objects)
    assert correct / len(scenes) >= 0.95


def test_detector_ignores_specks_and_off_palette_blobs():
    scene = Scene((SceneObject("red", "circle", "large", 32, 32),), BACKGROUND, "", "colors", None)
    pixels = np.array(render_scene(scene))
    pixels[2:4, 2:4] = (220, 30, 30)  # a 2x2 red speck
    pixels[45:60, 5:20] = (110, 90, 60)  # a brown patch: no palette colour
    detections = detect_objects(pixels)
    assert [(d.color, d.shape, d.size) for d in detections] == [("red", "circle", "large")]
    assert detect_objects(np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)) == []
    with pytest.raises(ValueError):
        detect_objects(np.zeros((64, 64), dtype=np.uint8))


def _obj(color: str, shape: str, cx: float, cy: float, size: str = "small", iou: float = 1.0) -> Detection:
    return Detection(color, shape, size, cx, cy, area=100.0, bbox=(0, 0, 1, 1), iou=iou)


def test_rules_per_category():
    red_circle, blue_square = _obj("red", "circle", 12, 32), _obj("blue", "square", 52, 32)
    assert check(parse_caption("a red circle to the left of a blue square"), [red_circle, blue_square])
    assert not check(parse_caption("a red circle to the right of a blue square"), [red_circle, blue_square])
    assert not check(parse_caption("a red circle above a blue square"), [red_circle, blue_square])
    # within the margin is no relation at all
    near = _obj("blue", "square", 16, 36)
    assert not check(parse_caption("a red circle to the left of a blue square"), [red_circle, near])
    assert check(
        parse_caption("a blue square below a red circle"), [red_circle, _obj("blue", "square", 12, 52)]
    )

    assert check(parse_caption("a red circle in the top left"), [_obj("red", "circle", 14, 10)])
    assert not check(parse_caption("a red circle in the top left"), [_obj("red", "circle", 32, 10)])
    assert check(parse_caption("a red circle in the center"), [_obj("red", "circle", 33, 31)])
    assert not check(parse_caption("a large red circle in the center"), [_obj("red", "circle", 33, 31)])

    triangles = [_obj("green", "triangle", x, 12) for x in (12, 32, 52)]
    assert check(parse_caption("three green triangles"), triangles)
    assert not check(parse_caption("two green triangles"), triangles)
    assert not check(
        parse_caption("three green triangles"), triangles[:2] + [_obj("red", "triangle", 52, 12)]
    )

    green_square, red_triangle = _obj("green", "square", 12, 12), _obj("red", "triangle", 52, 52)
    assert check(parse_caption("a green square and a red triangle"), [green_square, red_triangle])
    swapped = [_obj("red", "square", 12, 12), _obj("green", "triangle", 52, 52)]
    assert not check(parse_caption("a green square and a red triangle"), swapped)  # binding
    assert check(parse_caption("a square and a triangle"), swapped)
    assert not check(parse_caption("a square and a circle"), swapped)
    assert check(parse_caption("a small square"), swapped) and not check(
        parse_caption("a large square"), swapped
    )
    assert check(parse_caption("a red square"), swapped) and not check(
        parse_caption("a purple square"), swapped
    )


def test_clean_heldout_renders_score_one_and_shuffled_pairs_score_low():
    prompts = heldout_prompts(120, seed=0)
    rng = np.random.default_rng(0)
    images = [render_scene(scene_for_prompt(parse_caption(p), rng)) for p in prompts]
    report = score(prompts, images)
    assert set(report) == {*CATEGORIES, "overall", "per_prompt"}
    assert report["overall"] == 1.0 and all(report[c] == 1.0 for c in CATEGORIES)
    assert len(report["per_prompt"]) == 120 and all(p["passed"] for p in report["per_prompt"])

    order = rng.permutation(len(images))
    shuffled = score(prompts, [images[i] for i in order])
    assert shuffled["overall"] < 0.35
    failures = [p for p in shuffled["per_prompt"] if not p["passed"]]
    assert failures and all(isinstance(d, str) for d in failures[0]["detected"])

    only_counting = score(prompts[2:3], images[2:3])
    assert set(only_counting) == {"counting", "overall", "per_prompt"}
    with pytest.raises(ValueError):
        score(prompts, images[:-1])
    with pytest.raises(ValueError):
        score(["a red dog"], images[:1])


def test_judge_counts_only_recognisable_shapes_and_fails_cluttered_images():
    spec = parse_caption("a red circle")
    assert judge(spec, [_obj("red", "circle", 32, 32)])
    # a blob whose best template is a circle, but barely: not an object
    assert not judge(spec, [_obj("red", "circle", 32, 32, iou=MIN_SHAPE_IOU - 0.01)])
    # the right object amid more blobs than any scene of the grammar holds
    clutter = [_obj("blue", "square", 10 * i, 5) for i in range(CLUTTER_LIMIT)]
    assert judge(spec, [_obj("red", "circle", 32, 32), *clutter[:-1]])
    assert not judge(spec, [_obj("red", "circle", 32, 32), *clutter])


def test_noise_images_score_zero():
    """What an untrained model makes (smooth colour noise, decoded from random 16x16 latents) must not
    pass by chance: its dozen blobs of every colour and shape once satisfied "a star and a circle"."""
    rng = np.random.default_rng(21)
    prompts = heldout_prompts(60, seed=0)
    images = [
        Image.fromarray(rng.uniform(0, 255, (16, 16, 3)).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
        for _ in prompts
    ]
    assert max(len(detect_objects(image)) for image in images) > CLUTTER_LIMIT  # the detector does fire
    report = score(prompts, images)
    assert report["overall"] == 0.0, [p for p in report["per_prompt"] if p["passed"]]


# --- CMMD and the seen prompts --------------------------------------------------------------------
def _embeddings(rng, n: int, shift: float = 0.0, dim: int = 16) -> np.ndarray:
    """Unit vectors around a fixed direction, moved by ``shift`` along another axis (CLIP-like)."""
    points = rng.normal(0, 0.3, (n, dim))
    points[:, 0] += 1.0
    points[:, 1] += shift
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_cmmd_matches_the_definition_on_a_small_example():
    from ldm.evaluation.clip_metrics import CMMD_SCALE, CMMD_SIGMA, cmmd

    rng = np.random.default_rng(0)
    x, y = _embeddings(rng, 5), _embeddings(rng, 4, shift=0.5)

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * CMMD_SIGMA**2))

    xx = np.mean([k(x[i], x[j]) for i in range(5) for j in range(5) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(4) for j in range(4) if i != j])
    xy = np.mean([k(a, b) for a in x for b in y])
    assert cmmd(x, y) == pytest.approx(CMMD_SCALE * (xx + yy - 2 * xy), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-12)
    with pytest.raises(ValueError):
        cmmd(x[:1], y)
    with pytest.raises(ValueError):
        cmmd(x, y[:, :3])


def test_cmmd_is_zero_in_expectation_for_one_distribution_and_grows_with_a_shift():
    from ldm.evaluation.clip_metrics import cmmd

    rng = np.random.default_rng(1)
    same = [cmmd(_embeddings(rng, 64), _embeddings(rng, 64)) for _ in range(30)]
    mean, stderr = float(np.mean(same)), float(np.std(same) / np.sqrt(len(same)))
    assert abs(mean) < 3 * stderr + 1e-12  # unbiased: centred on 0 (the biased form sits above it)
    assert min(same) < 0 < max(same)
    shifted = [
        np.mean([cmmd(_embeddings(rng, 64), _embeddings(rng, 64, s)) for _ in range(5)])
        for s in (0.1, 0.3, 0.6, 1.0)
    ]
    assert all(a < b for a, b in zip(shifted, shifted[1:], strict=False)), shifted
    assert shifted[0] > mean + 5 * stderr


def test_reference_metrics_compare_two_halves_of_the_holdout_set():
    import torch

    from ldm.evaluation.clip_metrics import clip_score, cmmd, reference_metrics

    rng = np.random.default_rng(2)
    images = torch.from_numpy(_embeddings(rng, 20))
    texts = torch.from_numpy(_embeddings(rng, 20, shift=0.2))
    reference = reference_metrics(images, texts)
    assert reference["cmmd"] == pytest.approx(cmmd(images[0::2], images[1::2]))
    assert reference["clip_score"] == pytest.approx(float((images * texts).sum(-1).mean()))
    assert clip_score(images, images) == pytest.approx(1.0)


def test_seen_prompts_come_from_the_given_captions_balanced_and_never_held_out():
    from ldm.evaluation.synthetic import grammar_seen_captions, seen_prompts
    from ldm.synth.grammar import all_captions

    held = heldout_prompts(12, seed=0)
    rng = np.random.default_rng(3)
    trained = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]).caption for i in range(120)]
    captions = [*trained, *held, "a photo of a dog"]  # held-out and foreign captions are skipped
    prompts = seen_prompts(captions, 24, seed=5)
    assert len(prompts) == 24 and set(prompts) <= set(trained)
    assert not any(is_heldout(p) for p in prompts)
    counts = {c: sum(parse_caption(p).category == c for p in prompts) for c in CATEGORIES}
    assert counts == dict.fromkeys(CATEGORIES, 4), counts
    assert prompts == seen_prompts(reversed(captions), 24, seed=5)  # deterministic, order-free
    everything = grammar_seen_captions()
    grammar = [c for captions in all_captions().values() for c in captions]
    assert not any(is_heldout(c) for c in everything)
    assert len(everything) == len(grammar) - sum(is_heldout(c) for c in grammar) > 0
    with pytest.raises(ValueError):
        seen_prompts(["a photo of a dog"], 4)
