"""The committed Serve deploy config stays in sync with the code, and ServeConfig round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm.config.serve import ServeConfig
from serve.deploy_config import (
    BUILDER_IMPORT_PATH,
    DEPLOY_CONFIG_PATH,
    MODEL_DEPLOYMENT,
    app_args,
    cluster_config,
    gpu_cluster_config,
    render,
)

REPO = Path(__file__).resolve().parents[1]


def test_committed_deploy_config_is_what_the_code_generates():
    committed = (REPO / DEPLOY_CONFIG_PATH).read_text()
    assert committed == render(), (
        "infra/serve/serve-config.yaml is stale: run `python -m serve.deploy_config > "
        "infra/serve/serve-config.yaml`"
    )


def test_deploy_config_is_a_valid_serve_config_whose_args_build_the_app():
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / DEPLOY_CONFIG_PATH).read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay check
    (app,) = schema.applications
    assert app.import_path == BUILDER_IMPORT_PATH == "serve.app:build_app"
    assert app_args(ServeConfig.model_validate(app.args)) == app_args(cluster_config())
    # Ray's options where Ray users look for them, not in the builder's args
    (generator,) = app.deployments
    assert generator.name == MODEL_DEPLOYMENT == "Generator"
    assert generator.max_queued_requests == cluster_config().max_queued_requests
    assert generator.autoscaling_config["max_replicas"] == cluster_config().max_replicas
    assert "max_queued_requests" not in app.args and "replica_num_gpus" not in app.args
    # Ray's own path from YAML args to an application: the typed builder validates them as ServeConfig.
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="max_batch_sise"):
        call_user_app_builder_with_args_if_necessary(
            import_attr(app.import_path), {**app.args, "max_batch_sise": 2}
        )


def test_serve_config_round_trip_and_checks():
    cfg = ServeConfig(max_batch_size=8, max_ongoing_requests=8, reload_interval_s=5)
    assert ServeConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=8, max_ongoing_requests=4)
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)


def test_the_rayservice_config_requests_gpus_and_float16():
    config = yaml.safe_load(render(gpu_cluster_config()))
    (app,) = config["applications"]
    assert app["args"]["dtype"] == "float16"
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ValueError, match="float16 needs GPU"):
        ServeConfig(dtype="float16")


def test_replicas_get_the_s3_settings_and_config_files_do_not(monkeypatch):
    """`ldm serve --model s3://...`: the model replicas read the bucket with the caller's S3 settings
    (Ray workers do not see variables set after `ray.init`); a rendered serve config holds none."""
    from serve.app import build_app

    env = {
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "secret-value",
        "AWS_ENDPOINT_URL_S3": "http://s3:9",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Ray's own structures: the ingress deployment is bound to the model deployment's application.
    generator = build_app(ServeConfig(model="s3://bucket/model"))._bound_deployment.init_args[0]
    options = generator._bound_deployment.ray_actor_options
    assert options["runtime_env"]["env_vars"].items() >= env.items()
    assert options["num_cpus"] == ServeConfig().replica_num_cpus
    assert "secret-value" not in render(gpu_cluster_config())
