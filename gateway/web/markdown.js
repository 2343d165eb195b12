// A small, safe markdown renderer for streamed text: everything is HTML-escaped first, then a
// few constructs become tags (headings, lists, paragraphs, code, bold, italic). Syntax that is
// still open at the end of the text (a ** or ` or ``` whose close has not streamed in yet) is
// closed for the render, so the raw markers never flash on screen and nothing jumps when the
// close arrives.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
  }

  function closeOpenSyntax(text) {
    const fences = (text.match(/^```/gm) || []).length;
    if (fences % 2 === 1) return text + "\n```";
    // A "*" or "**" with nothing after it yet is not shown: it opens or closes, and a closing
    // one is put back below.
    text = text.replace(/(^|[^*])\*{1,2}$/, "$1");
    const last = text.split(/\n\s*\n/).pop();
    let tail = "";
    if (((last.match(/`/g) || []).length) % 2 === 1) tail += "`";
    const stars = last.replace(/`[^`]*`/g, "");
    if (((stars.match(/\*\*/g) || []).length) % 2 === 1) tail += "**";
    return text + tail;
  }

  function inline(escaped) {
    return escaped
      .replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[\s(])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
  }

  function blocks(text) {
    const out = [];
    const lines = text.split("\n");
    let paragraph = [];
    let list = null;
    let code = null;
    const flushParagraph = () => {
      if (paragraph.length) out.push("<p>" + inline(paragraph.join(" ")) + "</p>");
      paragraph = [];
    };
    const flushList = () => {
      if (list) out.push(`<${list.tag}>` + list.items.map((i) => `<li>${inline(i)}</li>`).join("") + `</${list.tag}>`);
      list = null;
    };
    for (const raw of lines) {
      const line = escapeHtml(raw);
      if (code !== null) {
        if (/^```/.test(raw)) { out.push("<pre><code>" + code.join("\n") + "</code></pre>"); code = null; }
        else code.push(line);
        continue;
      }
      if (/^```/.test(raw)) { flushParagraph(); flushList(); code = []; continue; }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
      if (heading) {
        flushParagraph(); flushList();
        const level = Math.min(6, heading[1].length + 2);
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        flushParagraph();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (line.trim() === "") {
        flushParagraph(); flushList();
      } else {
        flushList();
        paragraph.push(line.trim());
      }
    }
    if (code !== null) out.push("<pre><code>" + code.join("\n") + "</code></pre>");
    flushParagraph(); flushList();
    return out.join("");
  }

  window.renderMarkdown = function (text) {
    return blocks(closeOpenSyntax(text));
  };
  window.escapeHtml = escapeHtml;
})();
