"""The synthetic source: caption grammar, renderer, planted web-crawl faults, and the HTTP server."""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm.config.base import load_config
from ldm.config.synth import BadRowRates, SynthConfig
from ldm.contract import COL_CAPTION, COL_URL, WorkDir
from ldm.evaluation.geneval import check
from ldm.synth import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    PromptSpec,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render_batch,
    render_scene,
    sample_scene,
    scene_for_prompt,
)
from ldm.synth.grammar import ABSOLUTE_POSITION_PATTERN, all_captions
from ldm.synth.server import ImageServer
from ldm.synth.source import EXPECTED_REASON, FAULTS, read_truth, render_source, write_pairs
from pipelines.synth import run_synth


def test_vocabulary_covers_the_contract():
    assert len(COLORS) >= 8 and {"red", "green", "blue", "yellow"} <= set(COLORS)
    assert len(SHAPES) == 4 and len(SIZES) == 2 and len(POSITIONS) == 5
    assert CATEGORIES == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    rgb = {name: np.array(value, dtype=float) for name, value in COLORS.items()}
    closest_pair = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    closest_to_background = min(np.linalg.norm(v - np.array(BACKGROUND)) for v in rgb.values())
    assert closest_pair >= 100 and closest_to_background >= 120


@pytest.mark.parametrize(
    ("caption", "category", "relation", "position", "counts"),
    [
        ("a small star", "single_object", None, None, [1]),
        ("a circle and a square", "two_object", None, None, [1, 1]),
        ("three green triangles", "counting", None, None, [3]),
        ("a purple square", "colors", None, None, [1]),
        ("an orange circle", "colors", None, None, [1]),
        ("a red circle to the left of a blue square", "position", "left of", None, [1, 1]),
        ("a white star below a cyan triangle", "position", "below", None, [1, 1]),
        ("a small yellow star in the top left", "position", None, "top left", [1]),
        ("a green square and a red triangle", "color_attr", None, None, [1, 1]),
    ],
)
def test_parse_caption_examples(caption, category, relation, position, counts):
    spec = parse_caption(caption)
    assert (spec.category, spec.relation, spec.position) == (category, relation, position)
    assert [o.count for o in spec.objects] == counts
    assert spec.caption() == caption
    assert PromptSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red dog",
        "four red circles",
        "a circle and a circle",
        "a red circle and a red square",
        "a red circle and a square",
        "a red circle in the middle",
        "a circle left of a square",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_every_caption_round_trips_and_every_scene_satisfies_its_caption():
    captions = all_captions()
    assert sum(len(v) for v in captions.values()) > 4000
    for category, texts in captions.items():
        for text in texts:
            spec = parse_caption(text)
            assert spec.category == category and spec.caption() == text
    rng = np.random.default_rng(0)
    for i in range(600):
        scene = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        assert parse_caption(scene.caption) == scene.spec
        assert check(scene.spec, scene.objects), scene
        again = scene_for_prompt(scene.spec, rng)
        assert again.caption == scene.caption and check(scene.spec, again.objects)
        assert 1 <= len(scene.objects) <= 3


def test_scenes_use_all_positions_and_never_overlap():
    rng = np.random.default_rng(1)
    for position in POSITIONS:
        scene = scene_for_prompt(parse_caption(f"a large red square in the {position}"), rng)
        assert check(scene.spec, scene.objects)
    images, _, scenes = render_batch(200, seed=5)
    for image, scene in zip(images, scenes, strict=True):
        # every non-background pixel belongs to exactly one object's box: boxes are disjoint
        masks = []
        for obj in scene.objects:
            single = render_scene(type(scene)((obj,), scene.background, "", scene.category, scene.spec))
            masks.append(np.any(np.asarray(single) != BACKGROUND, axis=-1))
        assert not np.any(np.sum(masks, axis=0) > 1)
        assert np.array_equal(np.any(image != BACKGROUND, axis=-1), np.any(masks, axis=0))


def test_heldout_split_is_about_ten_percent_and_never_emitted():
    for category, texts in all_captions().items():
        fraction = sum(map(is_heldout, texts)) / len(texts)
        assert 0.08 <= fraction <= 0.2, (category, fraction)
    prompts = heldout_prompts(60, seed=0)
    assert all(map(is_heldout, prompts))
    assert collections.Counter(parse_caption(p).category for p in prompts) == {c: 10 for c in CATEGORIES}
    assert heldout_prompts(60, seed=0) == prompts and heldout_prompts(60, seed=1) != prompts
    _, captions, _ = render_batch(3000, seed=0)
    assert not any(map(is_heldout, captions))


def test_render_is_deterministic_and_balanced():
    images, captions, scenes = render_batch(60, seed=3)
    again, captions_again, _ = render_batch(60, seed=3)
    other, _, _ = render_batch(60, seed=4)
    assert images.dtype == np.uint8 and images.shape == (60, 64, 64, 3)
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, other)
    assert collections.Counter(s.category for s in scenes) == {c: 10 for c in CATEGORIES}
    assert np.array_equal(np.asarray(render_scene(scenes[0])), images[0])
    assert render_scene(scenes[0], size=128).size == (128, 128)
    _, _, scenes = render_batch(12, seed=0, categories=["colors"])
    assert {s.category for s in scenes} == {"colors"}
    with pytest.raises(ValueError):
        render_batch(2, seed=0, categories=["nonsense"])


def test_config_round_trips_and_validates(tmp_path):
    cfg = SynthConfig(num_pairs=10, bad_rows=BadRowRates(tiny=0.1))
    path = tmp_path / "synth.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(SynthConfig, path) == cfg
    assert load_config(SynthConfig, path, sets=["bad_rows.dead_url=0.2"]).bad_rows.dead_url == 0.2
    with pytest.raises(ValueError):
        BadRowRates(dead_url=0.3, not_image=0.3)
    with pytest.raises(ValueError):
        SynthConfig(num_pais=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(num_pairs=1000, seed=7, bad_rows=BadRowRates(duplicate=0.03, tiny=0.01))
    counts = render_source(cfg, out)
    return cfg, out, counts, read_truth(out)


def test_bad_row_counts_match_the_rates(source):
    cfg, _, counts, truth = source
    kinds = collections.Counter(row["kind"] for row in truth)
    assert kinds == counts and len(truth) == cfg.num_pairs
    for fault in FAULTS:
        assert abs(kinds[fault] / cfg.num_pairs - getattr(cfg.bad_rows, fault)) <= 0.5 / cfg.num_pairs
    assert kinds["duplicate"] == 30 and kinds["tiny"] == 10 and kinds["good"] == 1000 - 30 - 10 - 5 * 15
    for row in truth:
        assert row["expected_reason"] == EXPECTED_REASON[row["kind"]]
        assert parse_caption(row["caption"]).category == row["category"]
        assert PromptSpec.from_json(row["spec_json"]) == parse_caption(row["caption"])
    assert not any(is_heldout(row["caption"]) for row in truth)
    assert len({row["path"] for row in truth}) == len(truth)


def test_fault_files_are_what_they_claim(source):
    import cv2  # img2dataset decodes with OpenCV

    _, out, _, truth = source
    www = out / "www"
    digests = collections.Counter()
    for row in truth:
        kind, path = row["kind"], www / row["path"]
        if kind == "dead_url":
            assert not path.exists()
            continue
        if kind == "not_image":
            assert not path.exists() and (www / (row["path"] + ".html")).read_text().startswith(
                "<!doctype html>"
            )
            continue
        data = path.read_bytes()
        if kind == "truncated":
            assert data.startswith(b"\x89PNG") and b"IEND" not in data
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        size = Image.open(io.BytesIO(data)).size
        expected = {"tiny": (8, 8), "extreme_aspect": (256, 16)}.get(kind, (64, 64))
        assert size == expected, kind
        if kind in ("good", "duplicate", "caption_mismatch"):
            digests[hashlib.sha256(data).hexdigest()] += 1
    # the planted duplicates are the only repeated images: each appears exactly twice
    assert collections.Counter(digests.values()) == {1: len(digests) - 30, 2: 30}


def test_caption_mismatch_rows_contradict_their_image(source):
    from ldm.evaluation.detect import detect_objects

    _, out, _, truth = source
    rows = [r for r in truth if r["kind"] == "caption_mismatch"]
    good = [r for r in truth if r["kind"] == "good"][: len(rows)]
    for row in rows + good:
        detections = detect_objects(Image.open(out / "www" / row["path"]))
        assert check(parse_caption(row["caption"]), detections) == (row["kind"] == "good")


def test_render_source_is_deterministic(source, tmp_path):
    cfg, out, _, truth = source
    render_source(cfg, tmp_path)
    assert read_truth(tmp_path) == truth
    for row in truth[:50]:
        if row["kind"] not in ("dead_url", "not_image"):
            assert (tmp_path / "www" / row["path"]).read_bytes() == (out / "www" / row["path"]).read_bytes()


def _get(url: str, method: str = "GET") -> tuple[int, str | None, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], b""


def test_server_serves_bytes_and_statuses_over_http(source):
    _, out, _, truth = source
    by_kind = {}
    for row in truth:
        by_kind.setdefault(row["kind"], row)
    with ImageServer(out / "www") as server:
        assert server.port > 0 and server.base_url == f"http://127.0.0.1:{server.port}"
        pairs = pq.read_table(write_pairs(out, server.base_url)).to_pylist()
        assert {p[COL_URL] for p in pairs} == {f"{server.base_url}/{r['path']}" for r in truth}
        assert [p[COL_CAPTION] for p in pairs] != [r["caption"] for r in truth]  # shuffled
        for kind, row in by_kind.items():
            status, content_type, body = _get(f"{server.base_url}/{row['path']}")
            if kind == "dead_url":
                assert status == 404
            elif kind == "not_image":
                assert status == 200 and content_type.startswith("text/html") and b"<html>" in body
            else:
                assert status == 200 and content_type == "image/png"
                assert body == (out / "www" / row["path"]).read_bytes()
        good = by_kind["good"]["path"]
        status, _, body = _get(f"{server.base_url}/{good}", method="HEAD")
        assert status == 200 and body == b""
        assert _get(f"{server.base_url}/../truth.parquet")[0] == 404
        assert _get(f"{server.base_url}/")[0] == 404
    with pytest.raises(OSError):
        _get(f"{server.base_url}/{good}")  # stopped


def test_run_synth_writes_pairs_into_the_workdir(tmp_path):
    cfg = SynthConfig(workdir=str(tmp_path), num_pairs=120, base_url="http://127.0.0.1:9/")
    summary = run_synth(cfg)
    assert sum(summary["counts"].values()) == 120
    pairs = pq.read_table(WorkDir(tmp_path).pairs)
    assert pairs.column_names == [COL_URL, COL_CAPTION] and pairs.num_rows == 120
    assert all(
        url.startswith("http://127.0.0.1:9/") and "//" not in url[7:] for url in pairs[COL_URL].to_pylist()
    )
    assert pq.read_table(WorkDir(tmp_path).pairs) == pq.read_table(
        write_pairs(WorkDir(tmp_path).synth, cfg.base_url)
    )


def test_hard_negatives_are_false_of_their_scenes_and_one_attribute_away():
    from ldm.synth.grammar import sample_scene
    from ldm.synth.negatives import hard_negatives

    rng = np.random.default_rng(5)
    for _ in range(300):
        scene = sample_scene(rng)
        negatives = hard_negatives(scene.caption)
        assert negatives and scene.caption not in negatives
        for caption in negatives:
            assert not check(parse_caption(caption), scene.objects), (scene.caption, caption)
            # one attribute away: same number of words changed at most by a count/position phrase
            assert abs(len(caption.split()) - len(scene.caption.split())) <= 1
    assert "a red square" in hard_negatives("a red circle")
    assert "a blue circle and a red square" in hard_negatives("a red circle and a blue square")  # binding
    assert "a red circle to the right of a blue square" in hard_negatives(
        "a red circle to the left of a blue square"
    )


def test_every_caption_of_the_grammar_fits_the_bootstrap_clips_context():
    """The bootstrap CLIPs' contexts (the default's and the demo's shorter one, ldm/config/demo.py) hold
    every caption of the grammar: a longer caption would be cut, and the U-Net would never read its last
    words."""
    from open_clip.tokenizer import SimpleTokenizer

    from ldm.config.bootstrap import ClipConfig
    from ldm.config.demo import DemoConfig

    captions = sorted({caption for pool in all_captions().values() for caption in pool})
    tokens = SimpleTokenizer(context_length=77)(captions)
    longest = int((tokens != 0).sum(1).max())  # with the start and end tokens; 0 pads
    assert 8 <= longest <= min(ClipConfig().context_length, DemoConfig().bootstrap.clip.context_length), (
        longest
    )


def test_edit_kind_names_the_kind_of_every_hard_negative():
    from ldm.synth.grammar import parse_caption
    from ldm.synth.negatives import edit_kind, hard_negatives, hard_negatives_by_kind

    caption = "a small red circle in the top left"
    kinds = {n: edit_kind(parse_caption(caption), parse_caption(n)) for n in hard_negatives(caption)}
    assert kinds["a small red circle in the bottom right"] == "position"
    assert kinds["a small red square in the top left"] == "shape"
    assert kinds["a small blue circle in the top left"] == "colour"
    assert kinds["a large red circle in the top left"] == "size"
    assert set(kinds.values()) == {"position", "shape", "colour", "size"}
    grouped = hard_negatives_by_kind(caption)
    assert list(grouped) == ["colour", "position", "shape", "size"]
    assert sorted(sum(grouped.values(), [])) == sorted(hard_negatives(caption))
    assert all(kinds[n] == kind for kind, group in grouped.items() for n in group)
    relation = "a red star to the left of a blue square"
    assert (
        edit_kind(parse_caption(relation), parse_caption("a red star to the right of a blue square"))
        == "relation"
    )
    assert (
        edit_kind(parse_caption(relation), parse_caption("a blue star to the left of a red square"))
        == "binding"
    )


def test_the_absolute_position_pattern_matches_those_captions_and_no_other():
    """The demo oversamples rows by this pattern (`train.caption_repeats`): a caption of any other kind
    that matched would be oversampled too, an absolute one that did not would be left at 8%."""
    import re

    pattern = re.compile(ABSOLUTE_POSITION_PATTERN)
    matched = 0
    for captions in all_captions().values():
        for caption in captions:
            absolute = parse_caption(caption).position is not None
            assert bool(pattern.search(caption)) == absolute, caption
            matched += absolute
    assert matched == len(SHAPES) * (len(SIZES) + 1) * len(COLORS) * len(POSITIONS)
