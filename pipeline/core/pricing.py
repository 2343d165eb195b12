"""Cost in integer micro-USD from a per-model price table (config/prices.toml).

Prices are USD per million tokens, so a price of 1.00 is exactly 1 micro-USD per token. The
arithmetic is done in exact decimals and rounded half-up once per call, so a request's cost
never depends on float rounding.
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


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million input and output tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal

    def micro_usd(self, input_tokens: int, output_tokens: int) -> int:
        # USD per million tokens == micro-USD per token.
        exact = self.input_per_mtok * max(input_tokens, 0)
        exact += self.output_per_mtok * max(output_tokens, 0)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _price(raw: Any, where: str) -> ModelPrice:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    try:
        # str() first: Decimal(float) would carry the float's binary error into the bill.
        price = ModelPrice(
            Decimal(str(raw["input_per_mtok"])), Decimal(str(raw["output_per_mtok"]))
        )
    except (KeyError, InvalidOperation) as exc:
        raise ConfigError(f"{where} needs numeric input_per_mtok and output_per_mtok") from exc
    if price.input_per_mtok < 0 or price.output_per_mtok < 0:
        raise ConfigError(f"{where}: prices cannot be negative")
    return price


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

    def micro_usd(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """Cost of ``input_tokens`` + ``output_tokens`` on ``model`` in integer micro-USD."""
        return self.price_for(model).micro_usd(input_tokens, output_tokens)


@lru_cache(maxsize=8)
def price_table(path: Path = DEFAULT_PRICES_FILE) -> PriceTable:
    """The price table read once per path."""
    return PriceTable.load(path)


def price_micro_usd(model: str, input_tokens: int, output_tokens: int) -> int:
    """Cost in integer micro-USD from the default price table (config/prices.toml)."""
    return price_table().micro_usd(model, input_tokens, output_tokens)
