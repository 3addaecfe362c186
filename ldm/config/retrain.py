"""Config of `ldm retrain`: one scheduled-retraining cycle (new shards -> ingest -> fine-tune -> gate).

The cycle reads *source shards*: caption-pair files (Parquet, CSV or TSV with ``url`` and
``caption``) that land under ``source`` (a local folder or an ``s3://`` prefix). Shards are treated
as immutable: a new batch of data is a new file. Everything the cycle writes goes under ``root``:

- ``root/data/<shard-id>/``: one ingest output per source shard (``latents/``, ``rejects/``,
  ``manifest.json``; the manifest's ``input`` names the shard, which is how a later cycle knows it
  was ingested);
- ``root/train/<cycle-id>/``: the union of every ingested shard's latents, as training reads it;
- ``root/cycles/<cycle-id>.json``: the record of a finished cycle (what it trained on, the decision).

The job sections (``ingest``, ``train``, ``eval``) are the configs of those jobs; the cycle fills in
their inputs and outputs and always applies the promotion gate (``eval.gate``: metric, direction,
floor). ``lock_ttl_s``: how long a cycle's lock holds before another cycle may take it over (a cycle
that died keeps it until then); keep it well above the longest cycle.
"""

from __future__ import annotations

from pydantic import Field

from ldm.config.base import ConfigBase
from ldm.config.eval import EvalConfig
from ldm.config.ingest import IngestConfig
from ldm.config.train import TrainConfig
from ldm.contract import WorkDir

SHARD_SUFFIXES = (".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz")


class RetrainConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    source: str | None = None  # prefix of the source shards; default <workdir>/source
    root: str | None = None  # where the cycle keeps its data and records; default <workdir>/retrain
    model_name: str = "ldm"
    experiment: str = "retrain"  # MLflow experiment of the cycle's parent run
    # Fine-tune from the current champion when there is one (else train from scratch).
    fine_tune: bool = True
    shard_suffixes: tuple[str, ...] = SHARD_SUFFIXES
    max_new_shards: int | None = Field(None, ge=1)  # cap per cycle (oldest first); None: all of them
    lock_ttl_s: float = Field(6 * 3600.0, gt=0)
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def source_uri(self) -> str:
        return self.source or str(WorkDir(self.workdir).root / "source")

    @property
    def root_uri(self) -> str:
        return self.root or str(WorkDir(self.workdir).root / "retrain")

    def with_workdir(self) -> RetrainConfig:
        """A copy whose job sections use this config's work directory and model name."""
        update = {
            "ingest": self.ingest.model_copy(update={"workdir": self.workdir}),
            "train": self.train.model_copy(update={"workdir": self.workdir, "model_name": self.model_name}),
            "eval": self.eval.model_copy(
                update={"workdir": self.workdir, "model_name": self.model_name, "promote": True}
            ),
        }
        return self.model_copy(update=update)
