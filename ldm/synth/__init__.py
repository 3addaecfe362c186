"""The synthetic caption-image source: a caption grammar, a renderer, a web-crawl-like file server.

`grammar` says what captions exist and makes scenes that satisfy them; `render` turns scenes into
images; `source` writes a crawl (good rows and known bad rows) and `server` serves it over HTTP.
"""

from ldm.synth.grammar import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    format_caption,
    heldout_prompts,
    is_heldout,
    parse_caption,
    sample_scene,
    scene_for_prompt,
)
from ldm.synth.render import render_batch, render_scene

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "format_caption",
    "heldout_prompts",
    "is_heldout",
    "parse_caption",
    "render_batch",
    "render_scene",
    "sample_scene",
    "scene_for_prompt",
]
