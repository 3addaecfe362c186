"""Copy infra/serve/serve-config.yaml into the serveConfigV2 of infra/k8s/rayservice.yaml.

The serve config is kept by the serving side (and used by `serve deploy` outside Kubernetes); the
RayService must carry the very same text. Run from anywhere: ``python infra/sync_serve_config.py``.
``--check`` only reports whether they differ (exit 1), for CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
SERVE_CONFIG = INFRA / "serve" / "serve-config.yaml"
RAYSERVICE = INFRA / "k8s" / "rayservice.yaml"
MARKER = "  serveConfigV2: |\n"  # the last key of the RayService spec: the block runs to the end
INDENT = " " * 4


def rendered() -> str:
    """The RayService text with serveConfigV2 set to serve-config.yaml, indented as a literal block."""
    text = RAYSERVICE.read_text()
    if MARKER not in text:
        raise SystemExit(f"{RAYSERVICE}: no line {MARKER.strip()!r} (it must be the spec's last key)")
    head = text.split(MARKER, 1)[0]
    body = "".join(
        INDENT + line if line.strip() else "\n" for line in SERVE_CONFIG.read_text().splitlines(True)
    )
    return head + MARKER + body.rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    new = rendered()
    if "--check" in argv:
        same = new == RAYSERVICE.read_text()
        print("in sync" if same else f"{RAYSERVICE} differs from {SERVE_CONFIG}: run {Path(__file__).name}")
        return 0 if same else 1
    RAYSERVICE.write_text(new)
    print(f"wrote serveConfigV2 of {RAYSERVICE} from {SERVE_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
