from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from pipeline.llm.extractive import (
    MAX_SENTENCES,
    count_tokens,
    document_of,
    first_tokens,
    full_summary,
    summarize,
    tokens,
)

KAFKA = (
    "Apache Kafka is a distributed event streaming platform used for data pipelines. "
    "The weather in Lisbon was sunny on the day of the conference. "
    "Kafka stores streams of records in topics, and topics are split into partitions. "
    "Each partition of a Kafka topic is an ordered, append-only log of records. "
    "Producers write records to Kafka topics and consumers read records from partitions. "
    "Lunch was served at noon. "
    "A Kafka broker keeps records for a configurable retention period, e.g. seven days. "
    "Consumer groups let many consumers share the partitions of a topic. "
)

sentence_words = st.lists(
    st.sampled_from(["kafka", "log", "broker", "topic", "stream", "the", "of", "records"]),
    min_size=1,
    max_size=12,
)
documents = st.lists(
    sentence_words.map(lambda ws: " ".join(ws).capitalize() + "."), min_size=1, max_size=25
).map(" ".join)


def test_tokens_keep_leading_whitespace() -> None:
    assert tokens("Kafka is  fast.\nReally") == ["Kafka", " is", "  fast.", "\nReally"]
    assert tokens("") == []


def test_long_words_become_several_tokens() -> None:
    assert tokens(" internationalization") == [" internationa", "lization"]
    assert count_tokens("internationalization") == 2


@given(st.text())
def test_tokens_join_back_to_the_text(text: str) -> None:
    assert "".join(tokens(text)) == text


@given(st.text())
def test_count_tokens_counts_the_pieces_of_the_stripped_text(text: str) -> None:
    assert count_tokens(text) == len(tokens(text.strip()))


def test_count_tokens_is_about_one_per_word() -> None:
    assert count_tokens("  The quick brown fox.  ") == 4
    assert count_tokens(" \n\t ") == 0


def test_summary_keeps_the_on_topic_sentences_in_document_order() -> None:
    summary = summarize(KAFKA, 1000)
    assert summary == (
        "Kafka stores streams of records in topics, and topics are split into partitions. "
        "Producers write records to Kafka topics and consumers read records from partitions."
    )
    assert "weather" not in summary
    assert "Lunch" not in summary


def test_summary_length_follows_the_document() -> None:
    sentences = [f"Kafka topic number {i} holds records." for i in range(40)]
    assert summarize(" ".join(sentences), 10_000).count(".") == MAX_SENTENCES
    assert summarize(" ".join(sentences[:8]), 10_000).count(".") == 2
    assert summarize("Only one sentence here", 100) == "Only one sentence here"


def test_abbreviations_do_not_end_a_sentence() -> None:
    doc = "Brokers keep records for days, e.g. seven days by default. Cats sleep."
    assert full_summary(doc) == "Brokers keep records for days, e.g. seven days by default."


def test_max_tokens_cuts_the_summary_like_a_model() -> None:
    full = summarize(KAFKA, 10_000)
    cut = summarize(KAFKA, 7)
    assert tokens(cut) == tokens(full)[:7]
    assert cut == "Kafka stores streams of records in topics,"
    assert summarize(KAFKA, 0) == ""


@given(documents, st.integers(min_value=1, max_value=80), st.integers(min_value=1, max_value=80))
def test_a_shorter_budget_gives_a_prefix(doc: str, a: int, b: int) -> None:
    short, long = sorted((a, b))
    assert summarize(doc, long).startswith(summarize(doc, short))
    assert len(tokens(summarize(doc, short))) <= short


@given(documents)
def test_summary_sentences_come_from_the_document_in_order(doc: str) -> None:
    summary = full_summary(doc)
    position = 0
    for sentence in summary.split(". "):
        found = doc.find(sentence.rstrip("."), position)
        assert found >= position
        position = found + len(sentence)


@given(documents, st.sampled_from([" ", "\n", "\n\n", "  \t"]))
def test_reflowing_whitespace_does_not_change_the_summary(doc: str, gap: str) -> None:
    assert summarize(gap.join(doc.split(" ")) + "\n", 50) == summarize(doc, 50)


def test_summary_is_the_same_in_another_process() -> None:
    code = (
        "import sys; from pipeline.llm.extractive import summarize; "
        "sys.stdout.write(summarize(sys.stdin.read(), 60))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], input=KAFKA, capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert outputs == {summarize(KAFKA, 60)}


def test_empty_document_has_an_empty_summary() -> None:
    assert summarize("", 100) == ""
    assert summarize(" \n ", 100) == ""


def test_document_inside_tags() -> None:
    prompt = "Summarize this.\n<document>\nKafka is a log.\n</document>\nBe brief."
    assert document_of(prompt) == "Kafka is a log."
    assert document_of("  Kafka is a log.  ") == "Kafka is a log."
    nested = "<document>XML closes with </document> tags.</document>"
    assert document_of(nested) == "XML closes with </document> tags."


def test_first_tokens() -> None:
    assert first_tokens("a b c", 2) == "a b"
    assert first_tokens("a b c", 5) == "a b c"
