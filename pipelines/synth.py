"""`ldm synth`: render the synthetic source into the work directory, write its URL list, serve it.

The crawl itself (files, truth, URL list) is made by `ldm.synth.source`, the HTTP server is
`ldm.synth.server.ImageServer`; this module is the job around them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ldm.config.synth import SynthConfig
from ldm.contract import WorkDir
from ldm.errors import LdmError
from ldm.synth.server import ImageServer
from ldm.synth.source import TRUTH_FILE, WWW_DIR, render_source, write_pairs


def run_synth(cfg: SynthConfig) -> dict[str, Any]:
    """Render the source into ``cfg.workdir`` and write its URL list; returns a summary."""
    workdir = WorkDir(cfg.workdir)
    try:
        counts = render_source(cfg, workdir.synth)
    except ValueError as error:  # num_pairs / bad-row rates that leave no good rows
        raise LdmError(str(error)) from None
    pairs = write_pairs(workdir.synth, cfg.base_url)
    return {
        "rows": cfg.num_pairs,
        "counts": counts,
        "pairs": str(pairs),
        "truth": str(workdir.synth / TRUTH_FILE),
        "www": str(workdir.synth / WWW_DIR),
        "base_url": cfg.base_url,
    }


def serve_forever(cfg: SynthConfig) -> None:
    """`ldm synth --serve`: serve the rendered files on ``cfg.base_url`` until interrupted."""
    url = urlsplit(cfg.base_url)
    if url.scheme != "http" or url.hostname is None:
        raise LdmError(f"base_url must look like http://HOST:PORT, got {cfg.base_url!r}")
    root = WorkDir(cfg.workdir).synth / WWW_DIR
    if not root.is_dir():
        raise LdmError(f"{root} does not exist; run `ldm synth` first")
    try:
        server = ImageServer(root, host=url.hostname, port=url.port or 80)
    except OSError as error:  # port taken, address not on this machine
        raise LdmError(f"cannot serve on {cfg.base_url}: {error}") from None
    with server:
        print(f"serving {root} on {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
