"""Helpers shared by the ingest tests: tiny first-stage models on disk and a scriptable HTTP server.

Not a test module (no ``test_`` prefix): `tests/test_s3.py` and `tests/test_hostile.py` import it.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.config.bootstrap import AutoencoderConfig, ClipConfig
from ldm.contract import WorkDir

TINY_CLIP = ClipConfig(
    embed_dim=32,
    image_size=64,
    patch_size=16,
    vision_width=64,
    vision_layers=1,
    text_width=32,
    text_layers=1,
    head_width=16,
    context_length=16,
)
TINY_AE = AutoencoderConfig(block_out_channels=(8, 16, 16), norm_num_groups=8)
SCALING_FACTOR = 1.25


def write_tiny_models(root: Path) -> WorkDir:
    """Random tiny CLIP, autoencoder and text encoder where `ldm bootstrap` would put them."""
    from ldm.first_stage.autoencoder import build_autoencoder, save_autoencoder
    from ldm.first_stage.clip import build_clip, save_clip
    from ldm.first_stage.text_encoder import (
        build_text_tokenizer,
        clip_text_tower_to_transformers,
        save_text_encoder,
    )

    work = WorkDir(root)
    torch.manual_seed(0)
    clip = build_clip(TINY_CLIP)
    save_clip(clip, work.clip)
    save_text_encoder(build_text_tokenizer(clip), clip_text_tower_to_transformers(clip), work.models)
    vae = build_autoencoder(TINY_AE)
    vae.register_to_config(scaling_factor=SCALING_FACTOR)
    save_autoencoder(vae, work.autoencoder)
    return work


def picture(width: int = 64, height: int = 64, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (blocks of colour), so that different seeds look different to CLIP."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST)
    return image.convert(mode)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@dataclass
class Route:
    """One scripted answer of `ScriptedServer`."""

    body: bytes = b""
    content_type: str = "image/png"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (a slow server)
    location: str | None = None  # answer a 302 to this path


class ScriptedServer:
    """A stdlib HTTP server on 127.0.0.1 answering each path as its `Route` says; 404 otherwise."""

    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    if route.location is not None:
                        self.send_response(302)
                        self.send_header("Location", route.location)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the slow route): nothing to answer

            def log_message(self, format: str, *args) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
