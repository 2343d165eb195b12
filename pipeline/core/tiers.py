"""Service tiers (free/pro/enterprise by default), read from a TOML file (config/tiers.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import SumstreamError
from pipeline.core.resources import DEFAULT_TIERS_FILE as DEFAULT_TIERS_FILE

INPUT_POLICIES = ("truncate", "reject")


class ConfigError(SumstreamError):
    """A configuration file (tiers, prices) is missing or malformed."""

    code = "config_error"


@dataclass(frozen=True, slots=True)
class Tier:
    """The limits and scheduling share of one tier (docs/architecture.md, "Tiers and prices")."""

    name: str
    rpm: int
    tpm: int
    max_input_tokens: int
    max_output_tokens: int
    weight: int
    monthly_budget_usd: float
    max_queue_wait_s: float
    on_input_too_large: Literal["truncate", "reject"]
    # The models a request of this tier may name, its default first. Empty only for tiers
    # built in code (tests): the tier file requires a list, so a model name stays bounded.
    models: tuple[str, ...] = ()
    # Long documents (docs/architecture.md, "Long documents"): whether a document beyond
    # max_input_tokens (one call's allocation) is summarized by map-reduce, up to
    # max_document_tokens (0: max_input_tokens), in chunks of chunk_tokens, at most
    # map_concurrency chunk calls of one request at once, each chunk or collapse summary at
    # most reduce_output_tokens long.
    long_documents: bool = False
    max_document_tokens: int = 0
    chunk_tokens: int = 8_000
    map_concurrency: int = 4
    reduce_output_tokens: int = 512
    # Memory (docs/architecture.md, "Context and memory"): how long a conversation about a
    # summary may go on after the summary was requested.
    session_ttl_s: float = 3600.0
    # Input tokens of the user's own past summaries a request may add ("context": "history").
    memory_tokens: int = 1_000

    @property
    def document_limit(self) -> int:
        """The most tokens a document may have before on_input_too_large applies."""
        if not self.long_documents:
            return self.max_input_tokens
        return max(self.max_document_tokens, self.max_input_tokens)

    def limits(self) -> dict[str, int | bool]:
        """The tier's context allocation, as ``GET /v1/usage`` shows it."""
        return {
            "max_input_tokens": self.max_input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "long_documents": self.long_documents,
            "max_document_tokens": self.document_limit,
            "chunk_tokens": self.chunk_tokens,
            "map_concurrency": self.map_concurrency,
            "reduce_output_tokens": self.reduce_output_tokens,
        }

    @property
    def monthly_budget_micro_usd(self) -> int:
        return round(self.monthly_budget_usd * 1_000_000)

    @property
    def default_model(self) -> str | None:
        """The model a request that names none runs on (None: the worker's default)."""
        return self.models[0] if self.models else None

    def allows(self, model: str) -> bool:
        """Whether a request of this tier may name ``model``."""
        return not self.models or model in self.models


_INT_FIELDS = ("rpm", "tpm", "max_input_tokens", "max_output_tokens", "weight")
_FLOAT_FIELDS = ("monthly_budget_usd", "max_queue_wait_s")
# Optional, with the defaults of Tier; a tier without them takes no long documents.
_LONG_DOCUMENT_INTS = (
    "max_document_tokens",
    "chunk_tokens",
    "map_concurrency",
    "reduce_output_tokens",
)
# Optional, with the Tier field's default when absent.
_OPTIONAL_FLOAT_FIELDS = ("session_ttl_s",)
_OPTIONAL_INT_FIELDS = ("memory_tokens",)


def _tier(name: str, raw: Any, source: Path) -> Tier:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = {
        *_INT_FIELDS,
        *_FLOAT_FIELDS,
        *_OPTIONAL_FLOAT_FIELDS,
        *_OPTIONAL_INT_FIELDS,
        *_LONG_DOCUMENT_INTS,
        "long_documents",
        "on_input_too_large",
        "models",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: [{name}] has unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key in _INT_FIELDS:
        value = raw.get(key)
        # bool is an int subclass; a `true` here is a typo, not a limit.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: [{name}] {key} must be a positive integer")
        values[key] = value
    for key in _FLOAT_FIELDS:
        value = raw.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: [{name}] {key} must be a non-negative number")
        values[key] = float(value)
    for key in _OPTIONAL_FLOAT_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: [{name}] {key} must be a positive number")
        values[key] = float(value)
    for key in _OPTIONAL_INT_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: [{name}] {key} must be a non-negative integer")
        values[key] = value
    policy = raw.get("on_input_too_large", "reject")
    if policy not in INPUT_POLICIES:
        raise ConfigError(f"{source}: [{name}] on_input_too_large must be one of {INPUT_POLICIES}")
    models = raw.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m.strip() for m in models)
        or len(set(models)) != len(models)
    ):
        raise ConfigError(
            f"{source}: [{name}] models must be a non-empty list of distinct model names "
            "(the first is the tier's default)"
        )
    for key in _LONG_DOCUMENT_INTS:
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: [{name}] {key} must be a positive integer")
        values[key] = value
    long_documents = raw.get("long_documents", False)
    if not isinstance(long_documents, bool):
        raise ConfigError(f"{source}: [{name}] long_documents must be true or false")
    tier = Tier(
        name=name,
        on_input_too_large=policy,
        models=tuple(models),
        long_documents=long_documents,
        **values,
    )
    if tier.reduce_output_tokens * 2 > tier.chunk_tokens:
        # A collapse level must shrink the summaries, or the tree would never end.
        raise ConfigError(
            f"{source}: [{name}] reduce_output_tokens must be at most chunk_tokens / 2"
        )
    return tier


def load_tiers(path: Path = DEFAULT_TIERS_FILE) -> dict[str, Tier]:
    """Read every ``[tier]`` table of a TOML file into frozen ``Tier`` objects."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read tiers from {path}: {exc}") from exc
    tiers = {name: _tier(name, raw, Path(path)) for name, raw in data.items()}
    if not tiers:
        raise ConfigError(f"{path}: no tiers defined")
    return tiers


@lru_cache(maxsize=8)
def cached_tiers(path: Path = DEFAULT_TIERS_FILE) -> dict[str, Tier]:
    """``load_tiers`` read once per path (the file is configuration, not live state)."""
    return load_tiers(path)
