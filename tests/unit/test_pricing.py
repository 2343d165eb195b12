from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.pricing import (
    DEFAULT_PRICES_FILE,
    ModelPrice,
    PriceTable,
    price_micro_usd,
    price_table,
)
from pipeline.core.tiers import ConfigError

PRICES = """
[default]
input_per_mtok = 3
output_per_mtok = 15

[models."cheap"]
input_per_mtok = 0.8
output_per_mtok = 4.0

[models."free-model"]
input_per_mtok = 0
output_per_mtok = 0
"""


@pytest.fixture
def table(tmp_path: Path) -> PriceTable:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return PriceTable.load(path)


def test_one_usd_per_million_tokens_is_one_micro_usd_per_token() -> None:
    # claude-haiku-4-5: $1 in, $5 out per million tokens.
    assert price_micro_usd("claude-haiku-4-5", 1_000, 200) == 1_000 + 1_000
    assert price_micro_usd("claude-haiku-4-5", 0, 0) == 0


def test_fractional_prices_are_exact_and_rounded_half_up(table: PriceTable) -> None:
    assert table.micro_usd("cheap", 10, 0) == 8
    assert table.micro_usd("cheap", 1, 0) == 1  # 0.8 -> 1
    assert table.micro_usd("cheap", 3, 0) == 2  # 2.4 -> 2
    assert table.micro_usd("cheap", 0, 1) == 4
    assert table.micro_usd("cheap", 5, 0) == 4  # exactly 4.0
    half = ModelPrice(Decimal("0.5"), Decimal("0"))
    # Halves round up, never to even: 0.5 -> 1, 1.5 -> 2, 2.5 -> 3.
    assert [half.micro_usd(n, 0) for n in (1, 3, 5)] == [1, 2, 3]
    # 0.8 * 1_000_000 tokens = $0.80 exactly
    assert table.micro_usd("cheap", 1_000_000, 1_000_000) == 4_800_000


def test_unknown_model_uses_the_default_row_and_warns_once(
    table: PriceTable, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sumstream.pricing"):
        assert table.micro_usd("mystery", 100, 10) == 300 + 150
        assert table.micro_usd("mystery", 100, 10) == 450
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert getattr(warnings[0], "model", None) == "mystery"


def test_negative_counts_cost_nothing(table: PriceTable) -> None:
    assert table.micro_usd("cheap", -5, -5) == 0


@given(
    a_in=st.integers(0, 10**7),
    a_out=st.integers(0, 10**6),
    b_in=st.integers(0, 10**7),
    b_out=st.integers(0, 10**6),
)
def test_cost_is_monotone_in_tokens(a_in: int, a_out: int, b_in: int, b_out: int) -> None:
    table = price_table(DEFAULT_PRICES_FILE)
    low = table.micro_usd("claude-sonnet-4-5", min(a_in, b_in), min(a_out, b_out))
    high = table.micro_usd("claude-sonnet-4-5", max(a_in, b_in), max(a_out, b_out))
    assert 0 <= low <= high
    # Integer prices: the cost is exact.
    assert high == 3 * max(a_in, b_in) + 15 * max(a_out, b_out)


def test_free_model(table: PriceTable) -> None:
    assert table.micro_usd("free-model", 10**9, 10**9) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a \\[default\\] price row is required"),
        ("[default]\ninput_per_mtok = 1\n", "needs numeric"),
        ('[default]\ninput_per_mtok = "x"\noutput_per_mtok = 1\n', "needs numeric"),
        ("[default]\ninput_per_mtok = -1\noutput_per_mtok = 1\n", "negative"),
        ("models = 3\n[default]\ninput_per_mtok = 1\noutput_per_mtok = 1\n", "table of tables"),
        ("[default\n", "cannot read"),
    ],
)
def test_malformed_tables(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        PriceTable.load(path)


def test_every_shipped_model_has_a_positive_price() -> None:
    table = PriceTable.load(DEFAULT_PRICES_FILE)
    assert "claude-haiku-4-5" in table.models
    for name, price in table.models.items():
        assert price.input_per_mtok > 0 and price.output_per_mtok > 0, name
        assert price.output_per_mtok >= price.input_per_mtok, name
