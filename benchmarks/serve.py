"""Throughput and latency of the Serve endpoint with dynamic batching on and off, and dpmpp vs ddim.

1. Deploys the app on a private local Ray (one model replica), once with batching (``max_batch_size``
   8) and once without (``max_batch_size`` 1), and sends text-to-image requests over real HTTP at
   concurrency 1, 4 and 8: prints images/s and p50/p99 latency per setting, and the batching speed-up
   at each concurrency (target: >= 2x at 8).
2. Generates the held-out evaluation prompts with ``dpmpp`` at 20 steps and ``ddim`` at 50 steps on
   the same model and seeds; prints the `ldm eval` scores (GenEval-style, checked by code) and the time
   of each, and their ratios.

The model is ``--model URI`` if given, else the champion of ``./ldm-demo`` when a demo has run there,
else a tiny random-weight pipeline (which measures the serving machinery, and scores about zero).
Usage:

    .venv/bin/python benchmarks/serve.py [--model URI] [--requests-per-worker 6] [--eval-prompts 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# This script is named serve.py, like the `serve` package, and Python puts the script's folder first
# on sys.path: drop it, or `import serve.app` would find this file instead of the package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import requests  # noqa: E402

CONCURRENCY = (1, 4, 8)


def pick_model(requested: str | None, scratch: Path) -> tuple[str, str, str]:
    """(model URI, work directory, description) for the model to benchmark."""
    from ldm.contract import WorkDir

    if requested:
        return requested, "./ldm-demo", requested
    demo = WorkDir("./ldm-demo")
    if demo.mlflow_db.is_file():
        from ldm.registry import get_alias_version
        from ldm.tracking import configure

        configure(demo.root)
        version = get_alias_version("ldm", "champion")
        if version is not None:
            return "models:/ldm@champion", str(demo.root), f"the demo's champion (version {version})"
    from ldm.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(scratch / "tiny", seed=0)
    return str(folder), str(scratch), "a tiny random-weight pipeline (32 px; no trained model found)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_test(url: str, concurrency: int, per_worker: int, steps: int) -> dict[str, float]:
    def one(index: int) -> float:
        body = {"prompt": f"a red circle number {index}", "seed": index, "num_inference_steps": steps}
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/generate", json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started

    one(10**6)  # warm-up: the first request pays lazy imports
    total = concurrency * per_worker
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": total / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
    }


def bench_batching(model: str, workdir: str, per_worker: int, steps: int) -> dict[str, dict[int, dict]]:
    from ray import serve

    from ldm.config.serve import ServeConfig
    from serve.app import run_serve, shutdown_serve

    results: dict[str, dict[int, dict]] = {}
    try:
        for label, batch in (("batching on", 8), ("batching off", 1)):
            cfg = ServeConfig(
                workdir=workdir,
                model=model,
                port=0,
                min_replicas=1,
                max_replicas=1,
                max_ongoing_requests=8,
                max_queued_requests=64,
                max_batch_size=batch,
                batch_wait_timeout_s=0.02,
                reload_interval_s=0,
                torch_threads=2,
                replica_num_cpus=1,
                num_cpus=2,
            )
            url = run_serve(cfg, block=False, name="bench")
            results[label] = {c: load_test(url, c, per_worker, steps) for c in CONCURRENCY}
            for c, row in results[label].items():
                print(
                    f"{label:13s} concurrency {c}: {row['images_per_s']:7.2f} images/s  "
                    f"p50 {row['p50_s']:.3f} s  p99 {row['p99_s']:.3f} s",
                    flush=True,
                )
            serve.delete("bench")
    finally:
        shutdown_serve()
    return results


def bench_schedulers(model: str, num_prompts: int) -> dict[str, dict]:
    from ldm.evaluation.geneval import score
    from ldm.pipeline import generate, load_pipeline
    from ldm.synth.grammar import heldout_prompts

    pipe = load_pipeline(model).pipe
    prompts = heldout_prompts(num_prompts, 1234)
    results = {}
    for scheduler, steps in (("dpmpp", 20), ("ddim", 50)):
        started = time.perf_counter()
        images = [
            generate(pipe, prompt, seed=i, num_inference_steps=steps, scheduler=scheduler).images[0]
            for i, prompt in enumerate(prompts)
        ]
        elapsed = time.perf_counter() - started
        report = score(prompts, images)
        results[f"{scheduler}@{steps}"] = {
            "seconds": elapsed,
            "scores": {k: v for k, v in report.items() if k != "per_prompt"},
        }
        print(f"{scheduler}@{steps}: {elapsed:.1f} s, overall {report['overall']:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model URI (default: ./ldm-demo's champion, else a tiny model)")
    parser.add_argument("--requests-per-worker", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the load-test requests")
    parser.add_argument("--eval-prompts", type=int, default=24)
    args = parser.parse_args()

    import torch

    from ldm.runtime import ensure_ray

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="ldm-bench-serve-") as scratch:
        model, workdir, described = pick_model(args.model, Path(scratch))
        print(f"model: {described}")
        ensure_ray("local", 2)
        batching = bench_batching(model, workdir, args.requests_per_worker, args.steps)
        schedulers = bench_schedulers(model, args.eval_prompts)

    print("\n== ratios ==")
    for c in CONCURRENCY:
        on, off = batching["batching on"][c], batching["batching off"][c]
        print(
            f"concurrency {c}: batching speed-up {on['images_per_s'] / off['images_per_s']:.2f}x "
            f"(p50 {off['p50_s'] / on['p50_s']:.2f}x lower)"
        )
    dpm, ddim = schedulers["dpmpp@20"], schedulers["ddim@50"]
    print(
        f"dpmpp@20 vs ddim@50: {ddim['seconds'] / dpm['seconds']:.2f}x faster, overall score "
        f"{dpm['scores']['overall']:.3f} vs {ddim['scores']['overall']:.3f}"
    )
    print(json.dumps({"model": described, "batching": batching, "schedulers": schedulers}, default=str))


if __name__ == "__main__":
    main()
