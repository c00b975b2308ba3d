"""MkDocs hook: the configuration page's field reference, generated from the typed config at build time.

The rows are what `python -m rollout config --explain` prints (one line per field,
`path = default  # description`, registered names included), so the page cannot drift from the code
and no second walker of the config tree exists. `reward train`'s config comes from the same
`explain` function. A line that does not parse fails the build rather than leaving a field out.
"""

from __future__ import annotations

import contextlib
import io
import re

MARKER = re.compile(r"<!-- config-reference: ([a-z-]+) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not MARKER.search(markdown):
        return markdown
    return MARKER.sub(lambda m: _tables(m.group(1)), markdown)


def _tables(source: str) -> str:
    if source == "rollout":
        return _by_section(_job_lines())
    if source == "reward-train":
        from contracts.config.load import explain
        from reward.train_config import RewardTrainConfig

        return _by_section(explain(RewardTrainConfig), heading="####")
    raise ValueError(f"config-reference: unknown source {source!r} (rollout or reward-train)")


def _job_lines() -> list[str]:
    from rollout.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["config", "--explain"])
    if code != 0:
        raise RuntimeError(f"`rollout config --explain` exited {code}")
    return out.getvalue().splitlines()


def _by_section(lines: list[str], heading: str = "###") -> str:
    """One table per top-level section, in the order the config defines them."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for line in lines:
        path, default, description = _parse(line)
        section = path.split(".", 1)[0] if "." in path else "(top level)"
        sections.setdefault(section, []).append((path, default, description))
    parts = []
    for section, rows in sections.items():
        title = f"`{section}`" if section != "(top level)" else "Top level"
        parts.append(f"{heading} {title}\n\n| field | default | what it does |\n|---|---|---|")
        parts.extend(f"| `{path}` | {_code(default)} | {_cell(text)} |" for path, default, text in rows)
        parts.append("")
    return "\n".join(parts)


def _parse(line: str) -> tuple[str, str, str]:
    head, sep, description = line.partition("  # ")
    path, eq, default = head.partition(" = ")
    if not (sep and eq and path and " " not in path):
        raise ValueError(f"config-reference: cannot read the --explain line {line!r}")
    return path, default, description.strip()


def _code(default: str) -> str:
    # A backtick inside a default would end the code span early; the defaults are JSON and have none today.
    return f"`{default}`" if "`" not in default else _cell(default)


def _cell(text: str) -> str:
    # A pipe ends a table cell unless escaped; inside a code span the table reader already skips it,
    # and an escape there would be shown as written.
    parts = text.split("`")
    parts[::2] = [part.replace("|", "\\|") for part in parts[::2]]
    return "`".join(parts) or "-"
