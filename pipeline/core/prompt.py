"""The prompt sumstream sends a model, and the normalisation a document gets before it.

Shared by preprocess (which builds the prompt) and the gateway (which counts its tokens before
admitting a request, and rejects documents that normalise to nothing), so both agree.
"""

from __future__ import annotations

import re
import unicodedata

SYSTEM_PROMPT = (
    "You are a careful summarization engine. Summarize the document given inside "
    "<document> tags using only facts stated in it. Answer with the summary text only, "
    "without any preamble."
)
DEFAULT_INSTRUCTIONS = "Summarize the document above in at most {max_tokens} tokens."
CHUNK_INSTRUCTIONS = (
    "This is part {index} of {count} of a longer document. Summarize this part in at most "
    "{max_tokens} tokens; the summaries of all parts will be combined."
)
REDUCE_PREAMBLE = "The document above consists of summaries of consecutive parts of one document."

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_HSPACE_CHARS = "\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
# Only the horizontal space that changes: a run of two or more, or one that is not a plain
# space. Matching every single space (and every newline, below) made normalising a 1M-token
# document take ~0.4 s; a long document's plan waits for it (docs/architecture.md, "Long
# documents").
_HSPACE = re.compile(f"[ {_HSPACE_CHARS}]{{2,}}|[{_HSPACE_CHARS}]")
_SPACES = re.compile(r" {2,}")
_BLANK_LINES = re.compile(r"\n{3,}")
_DOCUMENT_TAG = re.compile(r"<(/?document)>", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """NFC, LF line ends, no control or zero-width characters, single spaces, <= 1 blank line."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
    text = _CONTROL.sub("", text)
    # ASCII text, the common case, has only tabs and spaces, which plain search finds faster.
    ascii_text = text.isascii()
    text = _SPACES.sub(" ", text.replace("\t", " ")) if ascii_text else _HSPACE.sub(" ", text)
    # No run of spaces is left, so a newline has at most one beside it on each side.
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def user_message(document: str, instructions: str) -> str:
    """The user turn: the document inside <document> tags, then the instructions."""
    return f"<document>\n{document}\n</document>\n\n{instructions}"


def normalize_document(document: str) -> str:
    """A document as the model sees it: ``<document>`` tags defused, then ``normalize_text``."""
    return normalize_text(_DOCUMENT_TAG.sub(r"[\1]", document))
