"""MkDocs hook: a section of the README, included in a page at build time.

The README's command table is the one list of commands; the quickstart page shows the same table,
so the two cannot disagree. In a page, `<!-- readme-section: Commands -->` ... `<!-- /readme-section -->`
is replaced by the body of the README's `## Commands` section; what stands between the two markers
is for readers of the Markdown file itself. A section that is not in the README fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"<!-- readme-section: ([^>]+?) -->.*?<!-- /readme-section -->", flags=re.S)
README = Path(__file__).resolve().parents[2] / "README.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not MARKER.search(markdown):
        return markdown
    readme = README.read_text()
    return MARKER.sub(lambda m: _section(readme, m.group(1)), markdown)


def _section(readme: str, title: str) -> str:
    """The body of the README's `## TITLE` section, up to the next `## ` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S)
    if found is None:
        raise ValueError(f"readme-section: README.md has no section '## {title}'")
    return _unescape_pipes_in_code(found.group(1).strip()) + "\n"


def _unescape_pipes_in_code(text: str) -> str:
    # GitHub needs `\|` for a pipe inside a code span in a table cell; MkDocs' table reader already
    # skips pipes in code spans and would show the backslash.
    parts = text.split("`")
    parts[1::2] = [part.replace("\\|", "|") for part in parts[1::2]]
    return "`".join(parts)
