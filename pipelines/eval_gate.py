"""The promotion gate: move ``champion`` to an evaluated version when it is at least as good as the
current champion on ``gate.metric`` and at least as good as ``gate.floor``.

Any key the evaluation reports can be the metric (``overall``, a category, ``seen.overall``,
``clip_score``, ``cmmd``...); the champion's value is the ``eval.<metric>`` tag its own evaluation left
on its model version, or, for a champion never evaluated that way, a fresh evaluation on the same
prompts. Ties go to the candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ldm import tracking
from ldm.config.eval import HIGHER_IS_BETTER, EvalConfig
from ldm.errors import LdmError
from pipelines.eval_log import score_tag

if TYPE_CHECKING:
    from pipelines.eval import EvalResult

Rescore = Callable[[EvalConfig, str], "EvalResult"]


def resolve_metric(cfg: EvalConfig, result: EvalResult) -> tuple[str, bool]:
    """The gate's metric and direction for this result (defaults per kind; unknown keys refused)."""
    metric = cfg.gate.metric or ("overall" if result.kind == "geneval" else "clip_score")
    if metric not in result.scores:
        raise LdmError(f"gate.metric {metric!r} is not a reported score; one of {sorted(result.scores)}")
    higher = cfg.gate.higher_is_better
    if higher is None:
        base = metric.removeprefix("seen.")
        higher = HIGHER_IS_BETTER.get(base, True if result.kind == "geneval" else None)
        if higher is None:
            raise LdmError(f"gate.higher_is_better must be set for gate.metric {metric!r}")
    return metric, higher


def gate(
    candidate: float,
    champion: float | None,
    floor: float | None,
    metric: str = "overall",
    higher_is_better: bool = True,
) -> tuple[bool, str]:
    """The promotion rule: at least as good as the champion and as the floor; returns (ok, reason)."""

    def worse(a: float, b: float) -> bool:
        return a < b if higher_is_better else a > b

    below, at_least = ("below", ">=") if higher_is_better else ("above", "<=")
    if math.isnan(candidate):
        return False, f"{metric} could not be measured"
    if floor is not None and worse(candidate, floor):
        return False, f"{metric} {candidate:.3f} is {below} the floor {floor:.3f}"
    if champion is not None and worse(candidate, champion):
        return False, f"{metric} {candidate:.3f} is {below} the champion's {champion:.3f}"
    if champion is None:
        floor_text = f" {at_least} floor {floor:.3f}" if floor is not None else ""
        return True, f"{metric} {candidate:.3f}{floor_text} and there is no champion yet"
    floor_text = f" and floor {floor:.3f}" if floor is not None else ""
    return True, f"{metric} {candidate:.3f} {at_least} champion's {champion:.3f}{floor_text}"


def champion_value(cfg: EvalConfig, metric: str, rescore: Rescore) -> tuple[str | None, float | None]:
    """The champion's version and its ``metric`` (None, None without a champion)."""
    from mlflow import MlflowClient

    from ldm.registry import get_alias_version

    version = get_alias_version(cfg.model_name, tracking.ALIAS_CHAMPION)
    if version is None:
        return None, None
    tags = MlflowClient().get_model_version(cfg.model_name, version).tags
    if score_tag(metric) in tags:
        return version, float(tags[score_tag(metric)])
    result = rescore(cfg, f"models:/{cfg.model_name}/{version}")  # never evaluated on this metric
    return version, result.scores.get(metric)


def apply_gate(cfg: EvalConfig, result: EvalResult, run_id: str, rescore: Rescore) -> dict[str, Any]:
    """Decide, move the alias when the gate passes, tag the eval run; returns the decision."""
    from mlflow import MlflowClient

    from ldm.registry import set_alias

    loaded = result.loaded
    if not cfg.promote:
        return {"promoted": False, "reason": "promotion not requested"}
    if not (loaded.name and loaded.version):
        return {"promoted": False, "reason": "the model is not a registered version (use models:/...)"}
    metric, higher = resolve_metric(cfg, result)
    champion_version, champion = champion_value(cfg, metric, rescore)
    if champion_version == loaded.version:
        decision: dict[str, Any] = {
            "promoted": False,
            "reason": f"version {loaded.version} already is the champion",
        }
    else:
        ok, reason = gate(result.scores[metric], champion, cfg.gate.floor, metric, higher)
        if ok:
            set_alias(loaded.name, tracking.ALIAS_CHAMPION, loaded.version)
        decision = {"promoted": ok, "reason": reason, "previous_champion": champion_version}
    decision["metric"] = metric
    client = MlflowClient()
    client.set_tag(run_id, "gate.promoted", str(decision["promoted"]))
    client.set_tag(run_id, "gate.reason", decision["reason"])
    client.set_tag(run_id, "gate.metric", metric)
    return decision
