"""Cost in integer micro-USD from a per-model price table (config/prices.toml).

Prices are USD per million tokens, so a price of 1.00 is exactly 1 micro-USD per token. The
arithmetic is done in exact decimals and rounded half-up once per call, so a request's cost
never depends on float rounding. Prompt-cache writes cost 1.25x and reads 0.1x the input price
unless a row says otherwise (docs/architecture.md, "Prompt caching").
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.core.resources import DEFAULT_PRICES_FILE as DEFAULT_PRICES_FILE
from pipeline.core.tiers import ConfigError

log = logging.getLogger("sumstream.pricing")


# The Messages API's prompt-cache prices as multiples of the input price (5-minute writes).
CACHE_WRITE_FACTOR = Decimal("1.25")
CACHE_READ_FACTOR = Decimal("0.1")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million input and output tokens, and per million cache-written and -read tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_write_per_mtok: Decimal | None = None  # None: CACHE_WRITE_FACTOR x input
    cache_read_per_mtok: Decimal | None = None  # None: CACHE_READ_FACTOR x input

    @property
    def cache_write(self) -> Decimal:
        if self.cache_write_per_mtok is not None:
            return self.cache_write_per_mtok
        return self.input_per_mtok * CACHE_WRITE_FACTOR

    @property
    def cache_read(self) -> Decimal:
        if self.cache_read_per_mtok is not None:
            return self.cache_read_per_mtok
        return self.input_per_mtok * CACHE_READ_FACTOR

    def micro_usd(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_creation_tokens: int = 0,
        cache_read_tokens: int = 0,
    ) -> int:
        # USD per million tokens == micro-USD per token.
        exact = self.input_per_mtok * max(input_tokens, 0)
        exact += self.output_per_mtok * max(output_tokens, 0)
        exact += self.cache_write * max(cache_creation_tokens, 0)
        exact += self.cache_read * max(cache_read_tokens, 0)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _price(raw: Any, where: str) -> ModelPrice:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    try:
        # str() first: Decimal(float) would carry the float's binary error into the bill.
        price = ModelPrice(
            Decimal(str(raw["input_per_mtok"])),
            Decimal(str(raw["output_per_mtok"])),
            _optional(raw, "cache_write_per_mtok"),
            _optional(raw, "cache_read_per_mtok"),
        )
    except (KeyError, InvalidOperation) as exc:
        raise ConfigError(f"{where} needs numeric input_per_mtok and output_per_mtok") from exc
    rates = (price.input_per_mtok, price.output_per_mtok, price.cache_write, price.cache_read)
    if any(rate < 0 for rate in rates):
        raise ConfigError(f"{where}: prices cannot be negative")
    return price


def _optional(raw: dict[str, Any], name: str) -> Decimal | None:
    return None if raw.get(name) is None else Decimal(str(raw[name]))


class PriceTable:
    """Prices per model, with a default row for models the table does not list."""

    def __init__(self, models: dict[str, ModelPrice], default: ModelPrice) -> None:
        self.models = models
        self.default = default
        self._warned: set[str] = set()

    @classmethod
    def load(cls, path: Path = DEFAULT_PRICES_FILE) -> PriceTable:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read prices from {path}: {exc}") from exc
        if "default" not in data:
            raise ConfigError(f"{path}: a [default] price row is required")
        models_raw = data.get("models", {})
        if not isinstance(models_raw, dict):
            raise ConfigError(f"{path}: [models] must be a table of tables")
        models = {name: _price(raw, f"{path}: [models.{name}]") for name, raw in models_raw.items()}
        return cls(models, _price(data["default"], f"{path}: [default]"))

    def price_for(self, model: str) -> ModelPrice:
        price = self.models.get(model)
        if price is not None:
            return price
        if model not in self._warned:
            # Once per model: an unknown model would otherwise warn on every request.
            self._warned.add(model)
            log.warning("no price for model, using the default row", extra={"model": model})
        return self.default

    def micro_usd(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_creation_tokens: int = 0,
        cache_read_tokens: int = 0,
    ) -> int:
        """Cost of a call on ``model`` in integer micro-USD, cache writes and reads included."""
        return self.price_for(model).micro_usd(
            input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens
        )


@lru_cache(maxsize=8)
def price_table(path: Path = DEFAULT_PRICES_FILE) -> PriceTable:
    """The price table read once per path."""
    return PriceTable.load(path)


def price_micro_usd(model: str, input_tokens: int, output_tokens: int) -> int:
    """Cost in integer micro-USD from the default price table (config/prices.toml)."""
    return price_table().micro_usd(model, input_tokens, output_tokens)
