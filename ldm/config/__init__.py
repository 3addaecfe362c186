"""One typed config per job; see `ldm.config.base` for how they are loaded."""

from ldm.config.base import ConfigBase, dump_config, load_config

__all__ = ["ConfigBase", "dump_config", "load_config"]
