"""The manifests under infra/ are valid and name real commands: checked offline, no cluster needed.

- Ray resources (RayCluster, RayJob, RayService, RayCronJob) against KubeRay's own CRD schemas
  (the four ``ray.io_*.yaml`` files of ray-project/kuberay ``ray-operator/config/crd/bases/``, 4 MB,
  not vendored: point ``KUBERAY_CRD_DIR`` at a folder holding them, else these tests skip),
  strictly: a field the CRD does not define is an error here, where an API server would drop it
  with a warning;
- core kinds (CronJob, Deployment, StatefulSet, Service, PVC...) with ``kubernetes-validate --strict``;
- the AWS cluster-launcher YAML against the schema Ray ships with the autoscaler;
- every entrypoint a manifest names is an ``ldm`` command with real flags (parsed by the CLI itself),
  and every job config it points at loads into that job's config class;
- the RayService carries infra/serve/serve-config.yaml verbatim.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from typer.exceptions import TyperException

from ldm.cli import app

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
KUBERAY_SCHEMAS = Path(os.environ.get("KUBERAY_CRD_DIR", REPO / "infra" / "kuberay-crds"))
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
CONFIG_MOUNT = "/etc/ldm/"  # where the ConfigMap of infra/k8s/configs/ is mounted in the pods
KUBERNETES_VERSION = "1.33.0"


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document under infra/k8s/ (configs/ are job configs)."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


MANIFESTS = manifests()
RAY_DOCS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] in CRD_FILES]
CORE_DOCS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] not in CRD_FILES]


def _ids(docs) -> list[str]:
    return [f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in docs]


# --- Ray resources against the KubeRay CRDs ------------------------------------------------------------
def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Forbid properties the schema does not list (unless it keeps unknown fields on purpose)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    # The CRDs are ~1 MB each: libyaml's loader reads one in under a second, pure Python in ~10 s.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((KUBERAY_SCHEMAS / CRD_FILES[kind]).read_text(), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return _strict(entry["schema"]["openAPIV3Schema"])
    raise AssertionError(f"the {kind} CRD has no version {version}")


def test_every_ray_kind_is_present():
    assert sorted({doc["kind"] for _, doc in RAY_DOCS}) == sorted(CRD_FILES)


@pytest.mark.parametrize(("name", "doc"), RAY_DOCS, ids=_ids(RAY_DOCS))
def test_ray_resources_match_the_kuberay_crds(name, doc):
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"no KubeRay CRD schemas at {KUBERAY_SCHEMAS} (set KUBERAY_CRD_DIR)")
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"], version))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, f"{name}: " + "\n".join(errors)


def test_the_crd_check_catches_a_misspelt_field():
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"no KubeRay CRD schemas at {KUBERAY_SCHEMAS}")
    (doc,) = [doc for _, doc in RAY_DOCS if doc["kind"] == "RayCluster"]
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not jsonschema.Draft7Validator(crd_schema("RayCluster", "v1")).is_valid(broken)


# --- core kinds ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "doc"), CORE_DOCS, ids=_ids(CORE_DOCS))
def test_core_kinds_are_valid_kubernetes(name, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{name}: {error.message} at {'.'.join(map(str, error.path))}")


def test_the_cronjob_never_runs_two_cycles_at_once():
    cron = next(doc for _, doc in CORE_DOCS if doc["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # The pod waits for the cycle (--wait): otherwise Forbid would only cover the submission.
    assert "--wait" in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    ray_cron = next(doc for _, doc in RAY_DOCS if doc["kind"] == "RayCronJob")
    assert ray_cron["spec"]["schedule"] == cron["spec"]["schedule"]  # once a day...
    assert ray_cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600  # ...and over within it


# --- entrypoints ------------------------------------------------------------------------------------
def entrypoints() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command a manifest runs: RayJob/RayCronJob entrypoints, container commands."""
    found = []
    for name, doc in MANIFESTS:
        spec = doc.get("spec", {})
        if doc["kind"] == "RayJob":
            found.append((f"{name}:entrypoint", shlex.split(spec["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            found.append((f"{name}:entrypoint", shlex.split(spec["jobTemplate"]["entrypoint"])))
        elif doc["kind"] == "CronJob":
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            found += [(f"{name}:{c['name']}", c["command"] + c.get("args", [])) for c in pod["containers"]]
    return found


ENTRYPOINTS = entrypoints()


def parse_ldm(argv: list[str]) -> tuple[Any, Any]:
    """Parse ``ldm ...`` with the real CLI (no execution): (command, its context with ``params``).

    Typer vendors its own click, so groups are recognised by what they do (``resolve_command``), and a
    bad command or flag raises a `TyperException` (click's UsageError).
    """
    if argv[:3] == ["python", "-m", "ldm.cli"]:
        argv = ["ldm", *argv[3:]]
    assert argv[0] == "ldm", f"not an ldm command: {argv}"
    group = typer.main.get_command(app)
    command, ctx, args = group, None, argv[1:]
    while hasattr(command, "resolve_command"):
        parent = command.make_context("ldm", args, parent=ctx, resilient_parsing=False)
        name, sub, rest = command.resolve_command(parent, parent._protected_args + parent.args)
        assert sub is not None, f"no ldm command {name!r}"
        command, ctx, args = sub, parent, rest
    return command, command.make_context(command.name, args, parent=ctx)


def _job_config_class(command: str) -> type:
    from pipelines.submit import config_class

    return config_class(command)


@pytest.mark.parametrize(("where", "argv"), ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_entrypoints_are_real_ldm_commands_with_real_configs(where, argv):
    from ldm.config import load_config

    command, ctx = parse_ldm(argv)
    job = ctx.params.get("job") or command.name  # `ldm submit JOB ...` or `ldm JOB ...`
    config = ctx.params.get("config")
    assert config is not None, f"{where}: name the job's config with --config"
    assert str(config).startswith(CONFIG_MOUNT), f"{where}: configs come from the ConfigMap at {CONFIG_MOUNT}"
    local = K8S / "configs" / str(config).removeprefix(CONFIG_MOUNT)
    assert local.is_file(), f"{where}: {config} is not in infra/k8s/configs/"
    cfg = load_config(_job_config_class(job), local, sets=ctx.params.get("set_"))
    assert cfg.workdir == "/mnt/ldm"  # the shared volume of infra/k8s/storage.yaml


def test_the_entrypoint_check_catches_a_wrong_flag():
    with pytest.raises(TyperException, match="--dat"):
        parse_ldm(["ldm", "train", "--dat", "s3://x"])
    with pytest.raises(TyperException):
        parse_ldm(["ldm", "trian", "--config", "x.yaml"])


def test_every_job_config_file_loads():
    for path in sorted((K8S / "configs").glob("*.yaml")):
        cfg = _job_config_class(path.stem)
        from ldm.config import load_config

        assert load_config(cfg, path).workdir == "/mnt/ldm", path.name


# --- the RayService carries the serve config ----------------------------------------------------------
def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", INFRA / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rayservice_serve_config_is_the_serving_config():
    sync = _sync_module()
    if not sync.SERVE_CONFIG.is_file():
        pytest.skip("infra/serve/serve-config.yaml not written yet (serving issue)")
    assert sync.rendered() == sync.RAYSERVICE.read_text(), "run `python infra/sync_serve_config.py`"


def test_serve_config_import_paths_resolve():
    rayservice = next(doc for _, doc in RAY_DOCS if doc["kind"] == "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for application in serve_config["applications"]:
        module, _, attribute = application["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), application["import_path"]


# --- the AWS cluster launcher ------------------------------------------------------------------------
def test_aws_cluster_launcher_config_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
