"""Pass 1 of the ingest job: one streaming Ray Data plan from input shards to staged rows.

    shards -> [task per shard: read, URL guard + caption + column checks, download (img2dataset),
               image filters; writes the shard's row file]
           -> [actor pool: `pipelines.stages.ScoreEncoder`: CLIP score + embedding, latent, caption]
           -> [task: writes the model outputs of each shard as staged parts]  -> driver: markers

Nothing is materialized: decoded images exist only between a shard task and the model actor, and
only for the rows still in the running (a rejected row never gets pixels). Every file is written
by a worker under ``<output>/_staging/rows/`` with a fresh name; a file counts only once the
driver lists it in the shard's marker (``shard-NNNNN.json``: counts, `KeyDigest` of the shard's
keys, the scores' histogram, the files), written when every row of the shard was staged. The
driver learns that from one marker row per shard that flows behind the shard's rows (``ldm_note``).
A re-run skips shards whose marker matches (`pipelines.ingest_plan.shard_fingerprint`) and deletes
files no marker lists (left by a killed run).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    COL_CAPTION,
    COL_HEIGHT,
    COL_KEY,
    COL_SHA256,
    COL_URL,
    COL_WIDTH,
    REJ_REASON,
    REJECT_COLUMNS,
)
from pipelines import download, filters, ingest_report
from pipelines.ingest_files import read_json, staging, sweep, write_json, write_table
from pipelines.ingest_plan import Shard, read_shard, shard_fingerprint
from pipelines.ingest_read import check_before_download
from pipelines.ingest_scale import KeyDigest, score_histogram
from pipelines.stages import COL_NOTE, COL_SHARD, ScoreEncoder

COL_THUMB = "ldm_thumb"  # a small JPEG of the row's picture, for the MLflow reject grids
HISTOGRAM_BINS = 4096
# the shard's row file: every input row, its verdict so far ("" = still in the running), no pixels
ROW_FILE_FIELDS = [
    *((name, pa.string()) for name in REJECT_COLUMNS),
    (COL_SHA256, pa.string()),
    (COL_WIDTH, pa.int32()),
    (COL_HEIGHT, pa.int32()),
    (COL_THUMB, pa.binary()),
]


def _thumbnail(image: np.ndarray | None) -> bytes | None:
    from PIL import Image

    if image is None:
        return None
    picture = Image.fromarray(image)
    picture.thumbnail((ingest_report.THUMBNAIL, ingest_report.THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


# --- the shard task ------------------------------------------------------------------------------
def _judge_downloads(fetched: pa.Table, cfg: IngestConfig) -> tuple[pa.Table, np.ndarray]:
    """The downloaded rows with their filter verdicts (row-file columns) and the accepted images."""
    names = (COL_KEY, COL_URL, COL_CAPTION, download.COL_STATUS, download.COL_ERROR, COL_SHA256)
    batch = {name: np.array(fetched.column(name).to_pylist(), dtype=object) for name in names}
    data = fetched.column(download.COL_IMAGE_BYTES).to_pylist()
    batch[download.COL_IMAGE_BYTES] = np.array(data, dtype=object)
    verdicts = filters.filter_downloads(batch, cfg.filters, cfg.image_size, duplicates={})
    accepted = verdicts[REJ_REASON] == filters.ACCEPTED
    thumbs = [
        _thumbnail(verdicts[filters.COL_IMAGE][i])
        if ok
        else (
            _thumbnail(ingest_report._thumbnail(data[i])) if reason in ingest_report.SAMPLED_REASONS else None
        )
        for i, (ok, reason) in enumerate(zip(accepted, verdicts[REJ_REASON], strict=True))
    ]
    columns = {name: fetched.column(name) for name in (COL_KEY, COL_URL, COL_CAPTION, COL_SHA256)}
    columns |= {name: pa.array(verdicts[name].tolist(), pa.string()) for name in REJECT_COLUMNS[3:]}
    columns |= {COL_WIDTH: pa.array(verdicts[COL_WIDTH], pa.int32())}
    columns |= {
        COL_HEIGHT: pa.array(verdicts[COL_HEIGHT], pa.int32()),
        COL_THUMB: pa.array(thumbs, pa.binary()),
    }
    carried = [n for n in fetched.column_names if n not in download.SHARD_SCHEMA.names]
    columns |= {name: fetched.column(name) for name in carried}
    schema = pa.schema([*ROW_FILE_FIELDS, *fetched.select(carried).schema])
    table = pa.table({name: columns[name] for name in schema.names})
    return table.cast(schema), verdicts[filters.COL_IMAGE][accepted]


def prepare_shard(
    shard: Shard, cfg: IngestConfig, carried: pa.Schema, output_uri: str
) -> dict[str, np.ndarray]:
    """One shard: read, check, download, filter, write its row file; returns the accepted rows with
    their images, then the shard's marker row."""
    rows = read_shard(shard, cfg.url_col, cfg.caption_col, carried)
    to_download, early = check_before_download(rows, cfg)
    fetched = download.fetch_shard(to_download, cfg.download, cfg.allowed_hosts)
    downloaded, images = _judge_downloads(fetched, cfg)
    schema = downloaded.schema
    table = (
        pa.concat_tables([*early, downloaded], promote_options="default").select(schema.names).cast(schema)
    )
    name = f"{shard.name}.rows-{uuid.uuid4().hex[:8]}.parquet"
    write_table(table, staging(output_uri, "rows", name))
    kept = downloaded.filter(pc.equal(downloaded.column(REJ_REASON), filters.ACCEPTED))
    n = kept.num_rows
    rejected = Counter(r for r in table.column(REJ_REASON).to_pylist() if r != filters.ACCEPTED)
    digest = KeyDigest.of(rows.column(COL_KEY).to_pylist())
    note = json.dumps(
        {"rows_file": name, "input": rows.num_rows, "staged": n, "rejected": dict(rejected),
         "digest": [digest.count, digest.sum64, digest.xor64]}
    )  # fmt: skip
    marker_image = np.zeros((1, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    texts = {
        name: np.array([*kept.column(name).to_pylist(), ""], dtype=object) for name in (COL_KEY, COL_CAPTION)
    }
    return texts | {
        COL_SHA256: np.array([*kept.column(COL_SHA256).to_pylist(), ""], dtype=object),
        filters.COL_IMAGE: np.concatenate(
            [np.asarray(images, dtype=np.uint8).reshape(n, *marker_image.shape[1:]), marker_image]
        ),
        COL_SHARD: np.full(n + 1, shard.index, dtype=np.int64),
        COL_NOTE: np.array([""] * n + [note], dtype=object),
    }


def prepare_shards(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    """`prepare_shard` over a batch of shard descriptions (JSON)."""
    outs = [prepare_shard(Shard(**json.loads(s)), **kwargs) for s in batch["shard"]]
    return {name: np.concatenate([out[name] for out in outs]) for name in outs[0]}


def _tensor_column(values: np.ndarray, name: str = "") -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    if name == filters.COL_IMAGE_EMBEDDING:  # a plain list: Ray's hash shuffle (pass 2) takes no Arrow tensor
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))


def write_model_rows(batch: dict[str, np.ndarray], output_uri: str) -> dict[str, np.ndarray]:
    """Model outputs -> one staged part per shard in the batch; returns one summary row per part
    and per marker row (shard, rows, file, histogram as JSON, note)."""
    summary: dict[str, list] = {"shard": [], "rows": [], "file": [], "histogram": [], "note": []}
    notes = batch[COL_NOTE]
    real = np.array([not n for n in notes], dtype=bool)
    for shard in np.unique(batch[COL_SHARD][real]):
        mask = real & (batch[COL_SHARD] == shard)
        table = pa.table(
            {name: _tensor_column(values[mask], name) for name, values in batch.items() if name != COL_NOTE}
        )
        name = f"shard-{int(shard):05d}.model-{uuid.uuid4().hex[:8]}.parquet"
        write_table(table, staging(output_uri, "rows", name))
        counts = score_histogram([batch["clip_score"][mask]], HISTOGRAM_BINS)
        nonzero = np.flatnonzero(counts)
        summary["shard"].append(int(shard))
        summary["rows"].append(int(mask.sum()))
        summary["file"].append(name)
        summary["histogram"].append(
            json.dumps(dict(zip(nonzero.tolist(), counts[nonzero].tolist(), strict=True)))
        )
        summary["note"].append("")
    for i in np.flatnonzero(~real):
        for key, value in (("shard", int(batch[COL_SHARD][i])), ("rows", 0), ("file", ""), ("histogram", "{}"),
                           ("note", str(notes[i]))):  # fmt: skip
            summary[key].append(value)
    return {
        key: np.array(values, dtype=np.int64 if key in ("shard", "rows") else object)
        for key, values in summary.items()
    }


# --- the driver ----------------------------------------------------------------------------------
def pass_one_settings(cfg: IngestConfig, models: dict) -> dict:
    """What shapes a staged shard besides its rows: a marker made with other settings is stale."""
    f = cfg.filters
    return {
        "download": cfg.download.model_dump(exclude={"shard_concurrency", "max_shard_attempts"}),
        "filters": [
            f.min_side,
            f.max_aspect_ratio,
            f.max_pixels,
            f.min_caption_chars,
            f.to_dict()["columns"],
        ],
        "columns": [cfg.url_col, cfg.caption_col, cfg.carry_columns, sorted(cfg.allowed_hosts)],
        "models": [models, cfg.image_size, cfg.store_text_embeddings, cfg.store_input_ids],
    }


def marker_uri(output_uri: str, shard: Shard) -> str:
    return staging(output_uri, "rows", f"{shard.name}.json")


def finished_shards(shards: list[Shard], output_uri: str, settings: dict) -> dict[int, dict]:
    """The markers of shards already staged with these settings; every other staged file is deleted."""
    done: dict[int, dict] = {}
    for shard in shards:
        marker = read_json(marker_uri(output_uri, shard))
        if marker is not None and marker["fingerprint"] == shard_fingerprint(shard, settings):
            done[shard.index] = _light(marker)
    keep = {f"shard-{i:05d}.json" for i in done}
    keep |= {name for marker in done.values() for name in [marker["rows_file"], *marker["model_files"]]}
    sweep(staging(output_uri, "rows"), keep)
    return done


class Progress:
    """Shards done / total, rows/s and rejects so far: a console line per staged shard, and the same
    figures to ``on_update`` (the job passes one that logs MLflow metrics)."""

    def __init__(self, total: int, reused: list[dict], on_update: Callable[[dict[str, float]], None] | None):
        self.total, self.on_update, self.started = total, on_update, time.monotonic()
        self.reused = len(reused)
        self.shards, self.rows, self.rejected = 0, 0, 0
        for marker in reused:
            self.add(marker, fresh=False)

    def add(self, marker: dict, fresh: bool = True) -> None:
        self.shards += 1
        self.rows += marker["input"] if fresh else 0
        self.rejected += sum(marker["rejected"].values())
        rate = self.rows / max(time.monotonic() - self.started, 1e-9)
        figures = {"shards_done": float(self.shards), "shards_total": float(self.total),
                   "rows_per_second_so_far": rate, "rejected_so_far": float(self.rejected)}  # fmt: skip
        if fresh:
            print(f"ingest: {self.shards}/{self.total} shards ({self.reused} reused), {self.rows} rows staged at "
                  f"{rate:.1f} rows/s, {self.rejected} rejected so far", flush=True)  # fmt: skip
            if self.on_update is not None:
                self.on_update(figures)


def _plan(todo: list[Shard], cfg: IngestConfig, carried: pa.Schema):
    """The Ray Data plan of pass 1 over the shards in ``todo`` (lazy)."""
    import ray
    import ray.data

    output = cfg.output_uri
    # a local Ray too small for the actor plus one shard task: the actor asks for less than a CPU
    spare = ray.cluster_resources().get("CPU", 1.0) - 0.75
    actor_cpus = max(min(cfg.encode.num_cpus, spare), 0.25)
    items = [{"shard": json.dumps(s.to_dict())} for s in todo]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            prepare_shards,
            fn_kwargs={"cfg": cfg, "carried": carried, "output_uri": output},
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=cfg.download.shard_concurrency),
            num_cpus=0.5,
            max_retries=cfg.download.max_shard_attempts - 1,
            retry_exceptions=True,
            **storage.s3_ray_options(),
        )
        .map_batches(
            ScoreEncoder,
            fn_constructor_kwargs={
                "clip_spec": cfg.clip_spec,
                "autoencoder_spec": cfg.autoencoder_spec,
                "text_encoder_spec": cfg.text_encoder_spec,
                "use_gpu": cfg.encode.num_gpus > 0,
                "torch_threads": cfg.torch_threads,
                "store_text_embeddings": cfg.store_text_embeddings,
                "store_input_ids": cfg.store_input_ids,
            },  # fmt: skip
            batch_size=cfg.encode.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.encode.concurrency),
            num_gpus=cfg.encode.num_gpus,
            num_cpus=actor_cpus,
            **storage.s3_ray_options(),
        )
        .map_batches(
            write_model_rows,
            fn_kwargs={"output_uri": output},
            batch_size=None,
            num_cpus=0.25,
            **storage.s3_ray_options(),
        )  # fmt: skip
    )


def stage_shards(
    shards: list[Shard],
    cfg: IngestConfig,
    settings: dict,
    carried: pa.Schema,
    on_progress: Callable[[dict[str, float]], None] | None = None,
) -> list[dict]:
    """Pass 1 over every shard not staged yet; returns every shard's marker, in shard order."""
    output = cfg.output_uri
    done = finished_shards(shards, output, settings)
    todo = [s for s in shards if s.index not in done]
    progress = Progress(len(shards), list(done.values()), on_progress)
    if todo:
        by_index = {s.index: s for s in todo}
        state: dict[int, dict] = {
            s.index: {"rows": 0, "files": [], "histogram": Counter(), "note": None} for s in todo
        }
        for batch in _plan(todo, cfg, carried).iter_batches(batch_format="numpy", batch_size=None):
            for shard, rows, name, histogram, note in zip(
                *(batch[k] for k in ("shard", "rows", "file", "histogram", "note")), strict=True
            ):
                entry = state[int(shard)]
                entry["rows"] += int(rows)
                entry["files"] += [str(name)] if name else []
                entry["histogram"].update({int(b): c for b, c in json.loads(histogram).items()})
                entry["note"] = json.loads(note) if note else entry["note"]
                if entry["note"] is not None and entry["rows"] == entry["note"]["staged"]:
                    marker = _marker(by_index[int(shard)], settings, entry)
                    write_json(marker_uri(output, by_index[int(shard)]), marker)
                    done[int(shard)] = _light(marker)
                    progress.add(marker)
                    entry["rows"] = -1  # written: later summary rows cannot re-trigger it
        missing = sorted(set(by_index) - set(done))
        if missing:
            raise RuntimeError(f"ingest: shards {missing[:5]} did not stage all their rows")
    return [done[s.index] for s in shards]


def _light(marker: dict) -> dict:
    """A marker as the driver keeps it: without the histogram (pass 2 counts the scores again,
    without the duplicates), so each shard costs the driver a few hundred bytes."""
    return {key: value for key, value in marker.items() if key != "histogram"}


def _marker(shard: Shard, settings: dict, entry: dict) -> dict:
    note = entry["note"]
    return {
        "fingerprint": shard_fingerprint(shard, settings),
        "shard": shard.to_dict(),
        "input": note["input"],
        "staged": note["staged"],
        "rejected": note["rejected"],
        "digest": note["digest"],
        "rows_file": note["rows_file"],
        "model_files": sorted(entry["files"]),
        "histogram": {str(b): c for b, c in sorted(entry["histogram"].items())},
    }
