"""Text from a dropped file: ``POST /v1/documents/text`` with the file's bytes as the body.

txt and md are UTF-8 text; html loses its markup (scripts and styles included); pdf goes
through pypdf. A scanned PDF (pages without a text layer) and an encrypted one are refused
with their own codes, so the page can say what to do. The body limit of every POST applies
(413), and so does the document limit of a summary to the text extracted.
"""

from __future__ import annotations

import asyncio
import io
import logging
from html.parser import HTMLParser
from pathlib import PurePath
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel
from pypdf import PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError

from gateway.http.errors import InvalidRequest, PayloadTooLarge
from gateway.http.routes import PROBLEM, GatewayDep, PrincipalDep

log = logging.getLogger("sumstream.gateway.documents")

router = APIRouter()

Kind = Literal["text", "html", "pdf"]
KINDS: dict[str, Kind] = {
    ".txt": "text",
    ".md": "text",
    ".markdown": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
MEDIA_TYPES: dict[str, Kind] = {
    "text/plain": "text",
    "text/markdown": "text",
    "text/html": "html",
    "application/pdf": "pdf",
}
# Fewer visible characters than this per page: the PDF has no text layer (a scan).
MIN_CHARS_PER_PAGE = 8


class UnsupportedDocument(InvalidRequest):
    """A file type the page cannot read (only txt, md, html and pdf)."""

    status = 415
    title = "Unsupported document type"
    code = "unsupported_document"


class UnreadableDocument(InvalidRequest):
    """A file that does not parse as what it says it is (bad UTF-8, a broken PDF)."""

    title = "Unreadable document"
    code = "unreadable_document"


class EncryptedDocument(InvalidRequest):
    """A PDF that needs a password to open."""

    title = "Encrypted PDF"
    code = "encrypted_document"


class NoTextLayer(InvalidRequest):
    """A PDF whose pages are images (a scan): there is no text to summarize without OCR."""

    title = "No text in the PDF"
    code = "no_text_layer"


class DocumentText(BaseModel):
    """The text extracted from a file, ready to submit as a document."""

    name: str
    kind: Kind
    text: str
    pages: int | None = None
    chars: int


class _TextOf(HTMLParser):
    """The visible text of an HTML document: no tags, scripts or styles."""

    SKIP = frozenset({"script", "style", "template", "noscript", "head"})
    BLOCKS = frozenset({"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def kind_of(name: str, content_type: str | None) -> Kind:
    """The file's kind from its extension, else its media type; 415 for anything else."""
    suffix = PurePath(name).suffix.lower()
    if suffix in KINDS:
        return KINDS[suffix]
    media = (content_type or "").split(";")[0].strip().lower()
    if media in MEDIA_TYPES:
        return MEDIA_TYPES[media]
    raise UnsupportedDocument(
        f"cannot read {suffix or media or 'this file'}: drop a .txt, .md, .html or .pdf file"
    )


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(f"the file is not UTF-8 text (byte {exc.start})") from None


def html_text(data: bytes) -> str:
    parser = _TextOf()
    parser.feed(_utf8(data))
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def pdf_text(data: bytes) -> tuple[str, int]:
    """The text of every page, and the page count; refuses encrypted and scanned PDFs."""
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise EncryptedDocument("the PDF is encrypted: save an unprotected copy and drop it")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (FileNotDecryptedError, DependencyError):
        # DependencyError: AES without the optional cryptography package; either way no text.
        raise EncryptedDocument(
            "the PDF is encrypted: save an unprotected copy and drop it"
        ) from None
    except (EncryptedDocument, NoTextLayer):
        raise
    except Exception as exc:
        # pypdf raises many types for malformed input (PdfReadError, ValueError, KeyError,
        # struct.error, RecursionError...): a file it cannot parse is the user's to fix.
        log.info("unreadable PDF", extra={"error": type(exc).__name__})
        raise UnreadableDocument(f"the PDF could not be read ({type(exc).__name__})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    visible = sum(1 for ch in text if not ch.isspace())
    if visible < MIN_CHARS_PER_PAGE * max(1, len(pages)) // 2:
        raise NoTextLayer(
            f"the PDF's {len(pages)} page(s) hold no text layer (a scan?): "
            "run OCR on it first, or paste the text"
        )
    return text, len(pages)


def extract(name: str, content_type: str | None, data: bytes) -> DocumentText:
    """The text of a file, by its kind."""
    kind = kind_of(name, content_type)
    pages: int | None = None
    if kind == "pdf":
        text, pages = pdf_text(data)
    elif kind == "html":
        text = html_text(data)
    else:
        text = _utf8(data)
    return DocumentText(name=name, kind=kind, text=text, pages=pages, chars=len(text))


@router.post(
    "/v1/documents/text",
    response_model=DocumentText,
    responses={401: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the file's bytes; its kind comes from ?name= (.txt, .md, .html, "
            ".pdf), else from Content-Type (text/plain, text/markdown, text/html, "
            "application/pdf)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "text/plain": {"schema": {"type": "string"}},
            },
        }
    },
)
async def document_text(
    request: Request,
    gateway: GatewayDep,
    principal: PrincipalDep,
    name: Annotated[str, Query(max_length=255, description="the file's name")] = "document.txt",
    content_type: Annotated[str | None, Header()] = None,
) -> DocumentText:
    """Extract the text of a txt, md, html or pdf file sent as the body (not summarized)."""
    data = await request.body()
    # PDF parsing is CPU work that must not stall every stream of the event loop.
    found = await asyncio.to_thread(extract, name, content_type, data)
    limit = gateway.settings.document_limit_bytes
    size = len(found.text.encode())
    if size > limit:
        raise PayloadTooLarge(f"the text of {name} is {size} bytes; the limit is {limit}")
    log.info(
        "document text extracted",
        extra={"user_id": principal.user_id, "kind": found.kind, "chars": found.chars},
    )
    return found
