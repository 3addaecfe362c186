"""The `ldm` console script as a user meets it, and the import rule that keeps the packages apart.

- Import rule (docs/DEVELOPING.md): `pipelines` and `serve` import `ldm`; no module in `ldm` imports
  them, except the CLI modules. No import circles among the three packages' top-level imports.
- Every option and argument has help text; closed sets are choices.
- Every command given input a user can get wrong ends in one line, ``error: ...``, and exit code 2,
  never a traceback. These run in-process with typer's CliRunner; each stops before any Ray or
  training work, so the file stays fast.
- Environment a user set is respected; ``--address`` falls back to ``RAY_ADDRESS``.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ldm.cli import Scheduler, app
from ldm.cli_cluster import Job

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "pipelines", "serve")
# The one place that knows all three packages (the console script, split in two for length).
CLI_MODULES = {"ldm.cli", "ldm.cli_cluster"}
# Import circles (counting imports inside functions too) that are known and owned by someone breaking
# them. Keep this explicit: each entry is one strongly connected set of modules; it should end empty.
# Circles through top-level imports are never allowed (Python fails on them at import time, or not,
# depending on which module is imported first).
# Circles the code base still has (none): a new one fails the test, and so does a fixed one left here.
KNOWN_CIRCLES: list[frozenset[str]] = []


# --- import rule and import circles -------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative import
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _all_imports(path: Path, module: str) -> set[str]:
    """Every import that can run, inside functions too; not those under ``if TYPE_CHECKING:``, which
    only a type checker reads (a type-only back-reference is no circle at run time)."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in type_only:
            found.update(_imported(node, module, path.name == "__init__.py"))
    return found


def _top_level_imports(path: Path, module: str) -> set[str]:
    """Imports that run when the module is imported (not inside functions, not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_imported(node, module, path.name == "__init__.py"))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found


def test_ldm_never_imports_pipelines_or_serve_except_the_cli():
    offenders = {}
    for module, path in _modules().items():
        if not module.startswith("ldm") or module in CLI_MODULES:
            continue
        bad = sorted(
            name for name in _all_imports(path, module) if name.split(".")[0] in ("pipelines", "serve")
        )
        if bad:
            offenders[module] = bad
    assert not offenders, f"ldm modules importing pipelines/serve: {offenders}"


def test_pipelines_never_import_serve():
    """The demo reaches the server through functions the CLI hands it, or HTTP."""
    offenders = {
        module: sorted(n for n in _all_imports(path, module) if n.split(".")[0] == "serve")
        for module, path in _modules().items()
        if module.startswith("pipelines")
    }
    assert not {m: names for m, names in offenders.items() if names}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in graph:
        if node not in index:
            connect(node)
    return found


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        imports = _top_level_imports(path, module) if top_level_only else _all_imports(path, module)
        for name in imports:
            # `from ldm.synth import grammar` names a module; `from ldm.contract import WorkDir` does not.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def test_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_top_level_import_circles():
    assert _circles(_import_graph(top_level_only=True)) == []


def test_no_import_circles_beyond_the_known_ones():
    circles = _circles(_import_graph(top_level_only=False))
    unknown = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not unknown, f"import circles: {unknown}"
    fixed = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not fixed, f"these circles are gone: remove them from KNOWN_CIRCLES: {fixed}"


# --- help and choices ---------------------------------------------------------------------------
def _commands(command: Any, prefix: str = "ldm") -> list[tuple[str, Any]]:
    """(name, click command) for the app and every subcommand (typer ships its own click classes)."""
    found = [(prefix, command)]
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            found += _commands(sub, f"{prefix} {name}")
    return found


def test_every_command_option_and_argument_has_help():
    missing = []
    commands = _commands(typer.main.get_command(app))
    for name, command in commands:
        if not command.help:
            missing.append(name)
        for param in command.params:
            if param.name != "help" and not getattr(param, "help", None):
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, f"no help text: {missing}"
    # the commands the README's table lists
    names = {name for name, _ in commands}
    for sub in ("synth", "bootstrap", "ingest", "train", "eval", "generate", "serve", "demo", "retrain",
                "submit", "jobs list", "jobs status", "jobs logs", "jobs stop"):  # fmt: skip
        assert f"ldm {sub}" in names


def test_closed_sets_are_choices_that_match_the_code():
    from ldm.pipeline import SCHEDULERS
    from pipelines.submit import SUBMITTABLE

    assert tuple(Scheduler) == SCHEDULERS and tuple(Job) == SUBMITTABLE
    result = CliRunner().invoke(app, ["generate", "--model", "m", "--prompt", "p", "--out", "o.png",
                                      "--scheduler", "plms"])  # fmt: skip
    assert result.exit_code == 2 and "'plms' is not one of" in result.output
    result = CliRunner().invoke(app, ["submit", "synth", "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "'synth' is not one of" in result.output


# --- one-line errors ----------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _fails_cleanly(args: list[str], expected: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(app, args, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()  # libraries may log before it (MLflow's INFO lines)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output and expected in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work directory for the module: MLflow creates its SQLite tables once (~30 s on busy cores)."""
    return tmp_path_factory.mktemp("cli") / "work"


def test_config_errors_name_the_problem(work, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_pairs: [\n")
    _fails_cleanly(["synth", "--workdir", str(work), "--config", str(bad_yaml)], "bad.yaml")
    _fails_cleanly(["synth", "--workdir", str(work), "--config", str(tmp_path / "nope.yaml")], "no such file")
    _fails_cleanly(["synth", "--workdir", str(work), "--set", "num_paris=3"], "num_paris: Extra inputs")
    _fails_cleanly(["synth", "--workdir", str(work), "--set", "num_pairs=many"], "num_pairs: Input should be")
    _fails_cleanly(["synth", "--workdir", str(work), "--set", "num_pairs"], "must look like key.sub=value")


def test_synth_serve_on_a_url_it_cannot_serve(work):
    args = ["synth", "--workdir", str(work), "--num-pairs", "8", "--base-url", "ftp://host/", "--serve"]
    _fails_cleanly(args, "base_url must look like http://HOST:PORT")


@pytest.mark.slow  # imports torch and creates the MLflow tables: ~80 s on busy cores, ~10 s quiet
def test_bootstrap_failed_gate(work):
    """A CLIP on disk whose recorded AUC is under the gate: the gate fails before any training."""
    from ldm.config.bootstrap import BootstrapConfig
    from ldm.contract import WorkDir
    from pipelines.bootstrap import METRICS_FILE, _digest

    cfg = BootstrapConfig(workdir=str(work))
    WorkDir(work).clip.mkdir(parents=True, exist_ok=True)
    (WorkDir(work).clip / METRICS_FILE).write_text(
        json.dumps({"digest": _digest(cfg, "clip"), "roc_auc": 0.5})
    )
    _fails_cleanly(["bootstrap", "--workdir", str(work)], "held-out ROC AUC = 0.5000 is below the gate 0.98")


def test_ingest_missing_input(work):
    _fails_cleanly(["ingest", "--workdir", str(work), "--input", str(work / "pairs.csv")], "--input")


def test_train_missing_data(work):
    _fails_cleanly(["train", "--workdir", str(work), "--data", str(work / "data")], "no such file or folder")


def test_retrain_missing_source(work):
    _fails_cleanly(["retrain", "--workdir", str(work)], "--source")


def test_eval_unknown_model_and_folder_that_is_not_a_model(work, tmp_path):
    _fails_cleanly(["eval", "--workdir", str(work), "--model", "models:/nosuchmodel@champion"], "nosuchmodel")
    _fails_cleanly(["eval", "--workdir", str(work), "--model", str(tmp_path)], "not a diffusers pipeline")


def test_generate_folder_that_is_not_a_model(work, tmp_path):
    out = str(tmp_path / "x.png")
    _fails_cleanly(["generate", "--workdir", str(work), "--model", str(tmp_path), "--prompt", "a", "--out", out],
                   "not a diffusers pipeline")  # fmt: skip


def test_serve_and_demo_bad_settings(work):
    _fails_cleanly(["serve", "--workdir", str(work), "--set", "max_batch_size=0"], "max_batch_size")
    _fails_cleanly(["demo", "--workdir", str(work), "--set", "images_per_prompt=9"], "images_per_prompt")


def test_submit_and_jobs_unreachable_cluster_and_ray_address(work):
    address = f"http://127.0.0.1:{_closed_port()}"
    _fails_cleanly(["submit", "ingest", "--address", address, "--workdir", str(work)], "cannot reach")
    _fails_cleanly(["submit", "ingest", "--address", address, "--env", "NOVALUE"], "NAME=VALUE")
    # no --address: RAY_ADDRESS, as Ray's CLIs do (RAY_API_SERVER_ADDRESS first, as `ray job` does)
    env = {"RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": None}
    for args in (["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        assert address in _fails_cleanly(args, "cannot reach", env=env)


# --- environment ----------------------------------------------------------------------------------
def test_environment_the_user_set_is_respected():
    code = (
        "import os; import ldm.cli; from ldm.runtime import offline_env; "
        "print(os.environ['HF_HUB_OFFLINE'], os.environ['NO_ALBUMENTATIONS_UPDATE'], offline_env()['HF_HUB_OFFLINE'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")}
    user = subprocess.run([sys.executable, "-c", code], env=env | {"HF_HUB_OFFLINE": "0"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert user.stdout.split() == ["0", "1", "0"]  # the user's value kept, the unset one defaulted
    default = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert default.stdout.split() == ["1", "1", "1"]


def test_ray_workers_wait_passively_and_the_cli_process_keeps_openmps_default():
    """Ray workers share the cores, so their OpenMP threads must not spin (WORKER_DEFAULTS); the CLI's
    own process trains the bootstrap alone and keeps OpenMP's default, unless the user set one."""
    code = (
        "import os; import ldm.cli; from ldm.runtime import worker_env; "
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), worker_env()['OMP_WAIT_POLICY'], "
        "worker_env()['HF_HUB_OFFLINE'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert default.stdout.split() == ["unset", "PASSIVE", "1"]
    user = subprocess.run([sys.executable, "-c", code], env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert user.stdout.split() == ["ACTIVE", "ACTIVE", "1"]


# --- dependencies ---------------------------------------------------------------------------------
def _third_party_imports() -> set[str]:
    sources = [path.read_text() for path in _modules().values()]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
        sources.append(
            "\n".join(
                line for c in code for line in c.splitlines() if not line.lstrip().startswith(("%", "!"))
            )
        )
    names: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES}


def test_every_import_of_the_packages_and_notebooks_is_a_declared_dependency():
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonical(re.split(r"[<>=!~\[; ]", dep)[0]) for dep in project["dependencies"]}
    distributions = packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "ray", "mlflow", "pandas"} <= imports  # the walk sees the code and the notebooks
    undeclared = {
        name: distributions.get(name)
        for name in imports
        if not {canonical(d) for d in distributions.get(name, [])} & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
