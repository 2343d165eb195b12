"""Intake's document check against preprocess's normalisation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.admission.intake import EMPTY_CHECK_PREFIX, normalises_to_nothing
from pipeline.core.prompt import normalize_document

# Characters normalisation removes or collapses, and a few it keeps (combining marks included).
INVISIBLE = "\x00\x01\x1f\x7f\x85\x9f\t\n\r \u00a0\u200b\u200c\u200d\u2028\u2060\u3000\ufeff"
VISIBLE = "a<document>\u0301\U0001d160e\u00e9"


@given(
    st.text(alphabet=st.sampled_from(INVISIBLE + VISIBLE), max_size=600),
    st.integers(0, EMPTY_CHECK_PREFIX + 50),
)
def test_the_empty_check_agrees_with_the_normalisation_of_the_whole_document(
    tail: str, invisible_start: int
) -> None:
    document = "\u200b" * invisible_start + tail
    assert normalises_to_nothing(document) == (normalize_document(document) == "")


def test_a_visible_character_after_a_long_invisible_start_is_found() -> None:
    assert not normalises_to_nothing("\x00" * 10_000 + "x")
    assert normalises_to_nothing("\x00\u200b " * 10_000)
