"""Write the serveConfigV2 of infra/k8s/rayservice.yaml from the serving code (the GPU variant).

infra/serve/serve-config.yaml is the CPU config (`serve run` / `serve deploy` anywhere); the RayService
carries the same file rendered for its GPU workers (one GPU per model replica, float16), from the same
code: `serve.deploy_config.render(gpu_cluster_config())`. Run from anywhere:
``python infra/sync_serve_config.py``; ``--check`` only reports whether it differs (exit 1), for CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
SERVE_CONFIG = INFRA / "serve" / "serve-config.yaml"
RAYSERVICE = INFRA / "k8s" / "rayservice.yaml"
MARKER = "  serveConfigV2: |\n"  # the last key of the RayService spec: the block runs to the end
INDENT = " " * 4


def _gpu_serve_config() -> str:
    # A script run as `python infra/...` has infra/ on sys.path, not the repository: add it.
    sys.path.insert(0, str(INFRA.parent))
    from serve.deploy_config import gpu_cluster_config, render

    return render(gpu_cluster_config())


def rendered() -> str:
    """The RayService text with serveConfigV2 set to the GPU serve config, indented as a literal block."""
    text = RAYSERVICE.read_text()
    if MARKER not in text:
        raise SystemExit(f"{RAYSERVICE}: no line {MARKER.strip()!r} (it must be the spec's last key)")
    head = text.split(MARKER, 1)[0]
    body = "".join(INDENT + line if line.strip() else "\n" for line in _gpu_serve_config().splitlines(True))
    return head + MARKER + body.rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    new = rendered()
    if "--check" in argv:
        same = new == RAYSERVICE.read_text()
        print("in sync" if same else f"{RAYSERVICE} differs from the serve config: run {Path(__file__).name}")
        return 0 if same else 1
    RAYSERVICE.write_text(new)
    print(f"wrote serveConfigV2 of {RAYSERVICE} (GPU variant of {SERVE_CONFIG.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
