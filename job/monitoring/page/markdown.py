"""The few Markdown forms eval/report.md uses (headings, tables, paragraphs, lists, **bold**,
images) as HTML, every piece of text escaped: the report is shown, never trusted as markup
(a Markdown library would pass raw HTML through)."""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape

IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
BOLD = re.compile(r"\*\*(.+?)\*\*")


def inline(text: str) -> str:
    return BOLD.sub(r"<strong>\1</strong>", escape(text))


def to_html(markdown: str, image: Callable[[str, str], str]) -> str:
    """HTML of ``markdown``; ``image(alt, target)`` gives the HTML of an image line."""
    out: list[str] = []
    table: list[list[str]] = []
    items: list[str] = []

    def close_blocks() -> None:
        if table:
            out.append(_table(table))
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if not all(set(c) <= set("-: ") and c for c in cells):  # not the |---|---| separator
                table.append(cells)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        close_blocks()
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        picture = IMAGE.match(line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)  # below the page's own headings
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif picture:
            out.append(image(picture.group(1), picture.group(2)))
        elif line:
            out.append(f"<p>{inline(line)}</p>")
    close_blocks()
    return "\n".join(out)


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    header = "".join(f"<th>{inline(c)}</th>" for c in head)
    lines = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="report"><thead><tr>{header}</tr></thead><tbody>{lines}</tbody></table>'
