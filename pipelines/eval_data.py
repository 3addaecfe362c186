"""What `ldm eval` reads besides the model: the training data's hold-out rows and captions, prompt files.

The hold-out rows (``split == "holdout"`` in ``latents/``, set aside by ingest and never trained on) are
the evaluation set on any data. Their images are *decoded from their latents* with the evaluated
model's autoencoder rather than downloaded again from their URLs: latents/ is all that a data folder
keeps, URLs rot (and the evaluation must run offline), and the decoded images are what the model's
own first stage can reproduce, so the reference values carry the same autoencoder loss as the model's
images do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm import storage
from ldm.contract import COL_CAPTION, COL_KEY, COL_LATENT, COL_SPLIT, LATENTS_DIR, SPLIT_HOLDOUT
from ldm.errors import DataError


@dataclass(frozen=True)
class HoldoutRows:
    """Hold-out rows in key order: captions and their unscaled latents [N, C, h, w] (float32)."""

    keys: list[str]
    captions: list[str]
    latents: np.ndarray


def _dataset_uri(data_uri: str) -> str:
    """A data folder's ``latents/`` when it has one, else ``data_uri`` itself (Parquet file or folder)."""
    latents = storage.join(data_uri, LATENTS_DIR)
    return latents if storage.exists(latents) else data_uri


def read_rows(data_uri: str, columns: list[str]) -> pa.Table:
    """``columns`` (plus ``split`` when present) of every latents row under ``data_uri``."""
    fs, path = storage.filesystem(_dataset_uri(data_uri))
    if not storage.exists(data_uri):
        raise DataError(f"no training data at {data_uri}")
    schema = pq.ParquetDataset(path, filesystem=fs).schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{data_uri}: latents rows lack the column(s) {missing}")
    wanted = [*columns, COL_SPLIT] if COL_SPLIT in schema.names else columns
    return pq.read_table(path, filesystem=fs, columns=wanted)


def read_holdout(data_uri: str, limit: int) -> HoldoutRows:
    """The first ``limit`` hold-out rows (by key) of the data at ``data_uri``."""
    table = read_rows(data_uri, [COL_KEY, COL_CAPTION, COL_LATENT])
    if COL_SPLIT not in table.column_names:
        raise DataError(
            f"{data_uri}: no `{COL_SPLIT}` column; ingest it with a hold-out split, "
            "or give a prompt file (--set prompts=FILE)"
        )
    table = table.filter(pc.equal(table[COL_SPLIT], SPLIT_HOLDOUT))
    if table.num_rows == 0:
        raise DataError(f"{data_uri}: no hold-out rows ({COL_SPLIT} == {SPLIT_HOLDOUT!r})")
    table = table.sort_by(COL_KEY).slice(0, limit)
    latents = table[COL_LATENT].combine_chunks()
    if not hasattr(latents, "to_numpy_ndarray"):
        raise DataError(f"{data_uri}: `{COL_LATENT}` is not a fixed-shape tensor column")
    return HoldoutRows(
        keys=[str(k) for k in table[COL_KEY].to_pylist()],
        captions=[str(c) for c in table[COL_CAPTION].to_pylist()],
        latents=latents.to_numpy_ndarray().astype(np.float32),
    )


def training_captions(data_uri: str) -> list[str]:
    """Distinct captions of the rows training read (every row but the hold-out ones)."""
    table = read_rows(data_uri, [COL_CAPTION])
    if COL_SPLIT in table.column_names:
        table = table.filter(pc.invert(pc.equal(pc.fill_null(table[COL_SPLIT], ""), SPLIT_HOLDOUT)))
    return sorted({str(c) for c in table[COL_CAPTION].to_pylist()})


def holdout_captions(data_uri: str) -> list[str]:
    """Captions of the hold-out rows ([] when the data has no ``split`` column)."""
    table = read_rows(data_uri, [COL_CAPTION])
    if COL_SPLIT not in table.column_names:
        return []
    return [str(c) for c in table.filter(pc.equal(table[COL_SPLIT], SPLIT_HOLDOUT))[COL_CAPTION].to_pylist()]


def read_prompt_file(uri: str) -> list[str]:
    """Prompts of a text file (local or s3://), one a line; blank lines and ``#`` comments skipped."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the prompt file {uri}: {error}") from error
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DataError(f"{uri}: no prompts (one prompt a line)")
    return prompts


def model_training_data(name: str | None, version: str | None) -> str | None:
    """The ``data.uri`` that the training run of registered model ``name``/``version`` logged, if any."""
    if not name or not version:
        return None
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return None
    return client.get_run(run_id).data.params.get("data.uri")
