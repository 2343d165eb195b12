"""Files shipped inside the package: the Avro schemas and the default configuration.

They live in ``pipeline/core/schemas/`` and ``pipeline/core/defaults/``; the repository's
``schemas/`` and ``config/`` are links to them (docs/architecture.md, "Package data").
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _packaged(name: str) -> Path:
    found = files(__package__ or "pipeline.core") / name
    # sumstream is installed unpacked (a wheel, an editable install or a checkout), never run
    # from a zip, so its package data are plain files that the loaders can open as paths.
    if not isinstance(found, Path):
        raise RuntimeError(f"sumstream's package data must be on disk, found {found!r}")
    return found


SCHEMA_DIR = _packaged("schemas")
DEFAULTS_DIR = _packaged("defaults")
DEFAULT_TIERS_FILE = DEFAULTS_DIR / "tiers.toml"
DEFAULT_PRICES_FILE = DEFAULTS_DIR / "prices.toml"
DEFAULT_PRODUCERS_FILE = DEFAULTS_DIR / "producers.toml"
