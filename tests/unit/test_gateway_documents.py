"""Text from dropped files: txt, md, html and pdf; clear refusals for the rest."""

from __future__ import annotations

import pytest

from gateway.http.documents import (
    EncryptedDocument,
    NoTextLayer,
    UnreadableDocument,
    UnsupportedDocument,
    extract,
)
from tests.pdfs import encrypted_pdf, scanned_pdf, text_pdf

LINES = ["Kafka keeps every event in order.", "The gateway streams (each) token as it comes."]


def test_a_pdf_gives_the_text_of_its_pages() -> None:
    found = extract("report.pdf", "application/pdf", text_pdf(LINES))
    assert found.kind == "pdf"
    assert found.pages == 1
    for line in LINES:
        assert line in found.text


def test_a_scanned_pdf_without_a_text_layer_is_refused_with_its_own_code() -> None:
    with pytest.raises(NoTextLayer, match="OCR") as caught:
        extract("scan.pdf", None, scanned_pdf())
    assert caught.value.code == "no_text_layer"


def test_an_encrypted_pdf_is_refused_with_its_own_code() -> None:
    with pytest.raises(EncryptedDocument) as caught:
        extract("locked.pdf", "application/pdf", encrypted_pdf(LINES))
    assert caught.value.code == "encrypted_document"


def test_a_broken_pdf_is_unreadable_not_a_server_error() -> None:
    with pytest.raises(UnreadableDocument):
        extract("broken.pdf", None, b"%PDF-1.4\nthis is not a pdf at all")


def test_html_loses_markup_scripts_and_styles() -> None:
    html = (
        b"<html><head><title>t</title><style>p{}</style></head><body><h1>Title</h1>"
        b"<p>First &amp; <b>bold</b></p><script>alert(1)</script><p>Second</p></body></html>"
    )
    assert extract("page.html", None, html).text == "Title\nFirst & bold\nSecond"


def test_text_and_markdown_are_utf8_and_bad_bytes_are_refused() -> None:
    assert extract("notes.md", None, "# Über\n".encode()).text == "# Über\n"
    with pytest.raises(UnreadableDocument, match="UTF-8"):
        extract("notes.txt", None, b"\xff\xfe\x00bad")


def test_other_types_are_unsupported_with_415() -> None:
    with pytest.raises(UnsupportedDocument) as caught:
        extract("sheet.xlsx", "application/vnd.ms-excel", b"PK")
    assert caught.value.status == 415
    # The media type decides when the name has no known extension.
    assert extract("clipboard", "text/plain", b"hello").kind == "text"
