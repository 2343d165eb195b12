from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.pricing import price_table
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import DEFAULT_TIERS_FILE, ConfigError, Tier, load_tiers

VALID = """
[basic]
rpm = 5
tpm = 1_000
max_input_tokens = 500
max_output_tokens = 100
weight = 2
monthly_budget_usd = 3
max_queue_wait_s = 10
on_input_too_large = "truncate"
models = ["small-model", "big-model"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def test_shipped_tiers_are_free_pro_enterprise_with_growing_limits() -> None:
    tiers = load_tiers(DEFAULT_TIERS_FILE)
    assert list(tiers) == ["free", "pro", "enterprise"]
    free, pro, ent = tiers["free"], tiers["pro"], tiers["enterprise"]
    for field in ("rpm", "tpm", "max_input_tokens", "max_output_tokens", "weight"):
        assert getattr(free, field) < getattr(pro, field) < getattr(ent, field), field
    assert free.on_input_too_large == "reject"
    assert pro.on_input_too_large == "truncate"


def test_worker_settings_point_at_the_shipped_file() -> None:
    assert WorkerSettings().tiers_file == DEFAULT_TIERS_FILE


def test_load_valid_file(tmp_path: Path) -> None:
    tiers = load_tiers(write(tmp_path, VALID))
    assert tiers == {
        "basic": Tier(
            name="basic",
            rpm=5,
            tpm=1000,
            max_input_tokens=500,
            max_output_tokens=100,
            weight=2,
            monthly_budget_usd=3.0,
            max_queue_wait_s=10.0,
            on_input_too_large="truncate",
            models=("small-model", "big-model"),
        )
    }
    assert tiers["basic"].monthly_budget_micro_usd == 3_000_000


def test_a_tier_allows_only_its_listed_models_and_defaults_to_the_first(tmp_path: Path) -> None:
    tier = load_tiers(write(tmp_path, VALID))["basic"]
    assert tier.default_model == "small-model"
    assert tier.allows("big-model")
    assert not tier.allows("claude-opus-4-1")
    assert not tier.allows("")


def test_shipped_tier_models_are_priced_nested_by_tier_and_default_to_the_worker_model() -> None:
    tiers = load_tiers(DEFAULT_TIERS_FILE)
    priced = set(price_table().models)
    for tier in tiers.values():
        assert set(tier.models) <= priced, tier.name
        assert tier.default_model == WorkerSettings().default_model
    free, pro, ent = (set(tiers[n].models) for n in ("free", "pro", "enterprise"))
    assert free < pro < ent
    # The most expensive model is for enterprise only.
    assert "claude-opus-4-1" in ent - pro


def test_tier_is_frozen(tmp_path: Path) -> None:
    tier = load_tiers(write(tmp_path, VALID))["basic"]
    with pytest.raises(AttributeError):
        tier.rpm = 10  # type: ignore[misc]


def test_policy_defaults_to_reject(tmp_path: Path) -> None:
    text = VALID.replace('on_input_too_large = "truncate"\n', "")
    assert load_tiers(write(tmp_path, text))["basic"].on_input_too_large == "reject"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("rpm = 5", "rpm = 0", "rpm must be a positive integer"),
        ("weight = 2", "weight = true", "weight must be a positive integer"),
        ("tpm = 1_000", "tpm = 1.5", "tpm must be a positive integer"),
        ("max_queue_wait_s = 10", "max_queue_wait_s = -1", "max_queue_wait_s"),
        ('"truncate"', '"drop"', "on_input_too_large"),
        ("rpm = 5", "rpm = 5\nburst = 3", r"unknown keys \['burst'\]"),
        ("max_input_tokens = 500\n", "", "max_input_tokens must be a positive integer"),
        ('models = ["small-model", "big-model"]', "", "models must be a non-empty list"),
        ('["small-model", "big-model"]', "[]", "models must be a non-empty list"),
        ('["small-model", "big-model"]', '"small-model"', "models must be a non-empty list"),
        ('["small-model", "big-model"]', '["a", "a"]', "models must be a non-empty list"),
        ('["small-model", "big-model"]', '["a", 3]', "models must be a non-empty list"),
        ('["small-model", "big-model"]', '["a", " "]', "models must be a non-empty list"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_named(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tiers(write(tmp_path, VALID.replace(old, new)))


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_tiers(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_tiers(write(tmp_path, "[free\nrpm ="))
    with pytest.raises(ConfigError, match="no tiers"):
        load_tiers(write(tmp_path, ""))


def test_long_document_allocation_is_optional_and_off_by_default(tmp_path: Path) -> None:
    basic = load_tiers(write(tmp_path, VALID))["basic"]
    assert basic.long_documents is False
    assert basic.document_limit == basic.max_input_tokens == 500
    assert basic.limits()["chunk_tokens"] == 8_000


def test_long_document_allocation_is_read(tmp_path: Path) -> None:
    text = VALID + (
        "long_documents = true\nmax_document_tokens = 9_000\nchunk_tokens = 1_000\n"
        "map_concurrency = 3\nreduce_output_tokens = 200\n"
    )
    basic = load_tiers(write(tmp_path, text))["basic"]
    assert basic.limits() == {
        "max_input_tokens": 500,
        "max_output_tokens": 100,
        "long_documents": True,
        "max_document_tokens": 9_000,
        "chunk_tokens": 1_000,
        "map_concurrency": 3,
        "reduce_output_tokens": 200,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("long_documents = 1\n", "long_documents must be true or false"),
        ("chunk_tokens = 0\n", "chunk_tokens must be a positive integer"),
        ("map_concurrency = true\n", "map_concurrency must be a positive integer"),
        ("chunk_tokens = 100\nreduce_output_tokens = 60\n", "at most chunk_tokens / 2"),
    ],
)
def test_bad_long_document_allocation_is_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tiers(write(tmp_path, VALID + extra))


def test_shipped_tiers_allocate_long_documents_to_pro_and_enterprise() -> None:
    tiers = load_tiers(DEFAULT_TIERS_FILE)
    assert not tiers["free"].long_documents
    assert tiers["pro"].long_documents and tiers["enterprise"].long_documents
    # An enterprise document of a million tokens is taken whole.
    assert tiers["enterprise"].document_limit >= 1_000_000
