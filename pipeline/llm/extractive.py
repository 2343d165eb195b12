"""A deterministic extractive summarizer and the tokenizer the LLM simulator streams with.

The summary is what a careful skimmer would keep: the sentences whose content words are the
document's most frequent ones, with a small bonus for coming early, in their original order.
Its length follows from the document alone (a quarter of the sentences, at most five);
``max_tokens`` then cuts it the way it cuts a real model's answer, so a shorter budget always
gives a prefix of a longer one. Whitespace is normalised first, so re-flowing a document
(``" ".join(doc.split())``) never changes its summary.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

# One token is optional leading whitespace plus up to 12 non-space characters: an English word
# is one token, a long word, URL or unspaced script becomes several. The trailing ``\s+`` keeps
# concatenation exact: "".join(tokens(text)) == text for every text.
MAX_TOKEN_CHARS = 12
_TOKEN = re.compile(rf"\s*\S{{1,{MAX_TOKEN_CHARS}}}|\s+")
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# A sentence ends at . ! ? (plus closing quotes or brackets) before a space; the next character
# decides, see _sentences.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]* ")
_DOCUMENT = re.compile(r"<document>(.*)</document>", re.DOTALL)

MAX_SENTENCES = 5
SENTENCES_PER_SUMMARY_SENTENCE = 4
# Sentences with fewer content words are scored as if they had this many, so a one-word
# sentence made of the top keyword does not beat a full sentence about it.
MIN_CONTENT_WORDS = 5
# The first sentence gets this much on top of a density in 0..1, decaying linearly to 0.
POSITION_WEIGHT = 0.2

STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each even few for
    from further had has have having he her here hers herself him himself his how however i if
    in into is it its itself just let me might more most must my myself no nor not now of off
    on once only or other our ours ourselves out over own same shall she should so some such
    than that the their theirs them themselves then there these they this those through thus
    to too under until up upon us very was we were what when where which while who whom why
    will with within without would yet you your yours yourself yourselves
    """.split()  # noqa: SIM905 - a word list reads better as text
)


def tokens(text: str) -> list[str]:
    """Split text into the pieces the simulator streams; joining them gives ``text`` back."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Approximate token count: the number of :func:`tokens` in the stripped text.

    About one per English word (real BPE tokenizers give ~1.3), one per 12 characters of a
    long word or unspaced script. Stable across versions, cheap, and equal to the number of
    deltas the simulator streams for the same text, so usage matches what a client counts.
    """
    # Same count as len(tokens(text.strip())) without building the pieces.
    words = text.split()
    long_words = (n for n in map(len, words) if n > MAX_TOKEN_CHARS)
    return len(words) + sum((n - 1) // MAX_TOKEN_CHARS for n in long_words)


def first_tokens(text: str, max_tokens: int) -> str:
    """The first ``max_tokens`` tokens of ``text`` (all of it when it is shorter)."""
    pieces = tokens(text)
    return text if len(pieces) <= max_tokens else "".join(pieces[: max(0, max_tokens)])


def document_of(prompt: str) -> str:
    """The document inside ``<document>...</document>``, or the whole prompt without the tags.

    The match is greedy (first opening tag to last closing tag), so a document that itself
    mentions ``</document>`` stays whole.
    """
    match = _DOCUMENT.search(prompt)
    return (match.group(1) if match else prompt).strip()


@lru_cache(maxsize=256)
def full_summary(document: str) -> str:
    """The summary before any ``max_tokens`` cut (cached: retries resend the same document)."""
    sentences = _sentences(document)
    if not sentences:
        return ""
    words = [_content_words(s) for s in sentences]
    frequency = Counter(w for ws in words for w in ws)
    top = max(frequency.values(), default=1)
    n = len(sentences)
    scores = [
        sum(frequency[w] for w in ws) / top / max(len(ws), MIN_CONTENT_WORDS)
        + POSITION_WEIGHT * (1 - i / n)
        for i, ws in enumerate(words)
    ]
    keep = min(MAX_SENTENCES, math.ceil(n / SENTENCES_PER_SUMMARY_SENTENCE))
    # Ties go to the earlier sentence, so the choice never depends on sort stability.
    chosen = sorted(sorted(range(n), key=lambda i: (-scores[i], i))[:keep])
    return " ".join(sentences[i] for i in chosen)


def summarize(document: str, max_tokens: int) -> str:
    """The extractive summary of ``document``, cut to at most ``max_tokens`` tokens."""
    return first_tokens(full_summary(document), max_tokens)


def _sentences(document: str) -> list[str]:
    text = " ".join(document.split())
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        # "e.g. the" or "approx. ten" go on: a sentence starts with anything but lower case.
        if text[match.end() : match.end() + 1].islower():
            continue
        sentences.append(text[start : match.end() - 1])
        start = match.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def _content_words(sentence: str) -> list[str]:
    return [w for w in _WORD.findall(sentence.lower()) if len(w) > 1 and w not in STOP_WORDS]
