"""`caption_repeats`: rows whose caption matches a pattern are read several times per epoch, their copies
spread over the block, hold-out rows never; with a real local Ray reading real Parquet."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ldm.config.train import CaptionRepeat, TrainConfig
from ldm.contract import COL_CAPTION, COL_KEY, COL_LATENT, COL_SPLIT, COL_TEXT_EMBEDDING, LATENTS_DIR
from ldm.errors import DataError
from ldm.synth.grammar import ABSOLUTE_POSITION_PATTERN
from pipelines.train.data import repeat_rows
from pipelines.train.job import training_dataset
from tests.test_train import CAPTIONS, write_tiny_workdir


def caption_table(captions: list[str]) -> pa.Table:
    return pa.table({COL_KEY: [f"{i:05d}" for i in range(len(captions))], COL_CAPTION: captions})


def test_first_matching_rule_decides_how_often_a_row_is_read():
    table = caption_table(["a red circle", "a red square", "a star in the top left", "two blue stars"])
    rules = [CaptionRepeat(pattern="circle", repeats=3), CaptionRepeat(pattern="red", repeats=5)]
    out = Counter(repeat_rows(table, rules, seed=0).column(COL_CAPTION).to_pylist())
    # "a red circle" matches both: the first rule (3) wins, not the second (5).
    assert out == {"a red circle": 3, "a red square": 5, "a star in the top left": 1, "two blue stars": 1}


def test_no_match_leaves_the_table_as_it_is():
    table = caption_table(CAPTIONS)
    assert repeat_rows(table, [CaptionRepeat(pattern="hexagon", repeats=4)], seed=0).equals(table)
    assert repeat_rows(table, [], seed=0).equals(table)


def test_copies_are_spread_over_the_block_and_the_order_follows_the_seed():
    captions = [f"a shape number {i}" for i in range(180)] + [
        f"a star {i} in the top left" for i in range(20)
    ]
    table = caption_table(captions)
    rules = [CaptionRepeat(pattern=ABSOLUTE_POSITION_PATTERN, repeats=10)]
    out = repeat_rows(table, rules, seed=0)
    keys = out.column(COL_KEY).to_pylist()
    assert len(keys) == 180 + 20 * 10
    # Side by side, the ten copies of a row would make 20 x 9 equal neighbours; shuffled, ~5.
    assert sum(a == b for a, b in zip(keys, keys[1:], strict=False)) < 20
    spans = [
        max(i for i, k in enumerate(keys) if k == key) - keys.index(key)
        for key in table.column(COL_KEY).to_pylist()[180:]
    ]
    assert np.median(spans) > len(keys) / 2
    assert repeat_rows(table, rules, seed=0).equals(out)
    assert not repeat_rows(table, rules, seed=1).equals(out)


def test_repeats_need_the_caption_column():
    table = pa.table({COL_KEY: ["0"], COL_LATENT: [1.0]})
    with pytest.raises(DataError, match="caption"):
        repeat_rows(table, [CaptionRepeat(pattern="x", repeats=2)], seed=0)


def test_a_pattern_that_is_not_a_regex_or_a_zero_repeat_is_refused():
    with pytest.raises(ValidationError, match="not a regular expression"):
        TrainConfig(caption_repeats=[{"pattern": "in the (top", "repeats": 2}])
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TrainConfig(caption_repeats=[{"pattern": "top", "repeats": 0}])


def test_the_training_dataset_repeats_training_rows_only(tmp_path, ray_local):
    """Through Ray Data as the job reads it: 32 rows, 8 of each caption; "red circle" rows 4 times,
    one file of hold-out rows that match too and stay out."""
    work = write_tiny_workdir(tmp_path, rows=32)
    latents = work.data / LATENTS_DIR
    train_file = latents / "part-00000.parquet"
    table = pq.read_table(train_file)
    with_split = table.append_column(COL_SPLIT, pa.array(["train"] * table.num_rows))
    pq.write_table(with_split.replace_schema_metadata(table.schema.metadata), train_file)
    holdout = with_split.slice(0, 4).set_column(
        with_split.schema.get_field_index(COL_SPLIT), COL_SPLIT, pa.array(["holdout"] * 4)
    )
    pq.write_table(holdout.replace_schema_metadata(table.schema.metadata), latents / "part-00001.parquet")

    cfg = TrainConfig(caption_repeats=[{"pattern": "red circle", "repeats": 4}])
    for cached in (False, True):
        dataset = training_dataset(cfg, str(latents), COL_TEXT_EMBEDDING, cached)
        assert set(dataset.columns()) == {COL_LATENT, COL_TEXT_EMBEDDING}
        assert dataset.count() == 8 * 4 + 24
    plain = training_dataset(TrainConfig(), str(latents), COL_TEXT_EMBEDDING, cached=False)
    assert plain.count() == 32
