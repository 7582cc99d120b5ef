"""Write docs/config.md, the config reference, from the config dataclasses themselves (defaults and comments).

    python scripts/config_reference.py            # rewrite docs/config.md
    python scripts/config_reference.py --check    # exit 1 if docs/config.md is out of date (the tests run this)

The dataclasses are the only place defaults live; generating the reference from them keeps the docs honest.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

from omegaconf import MISSING

from rlhf_loop.config import RunConfig

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"
FIELD_LINE = re.compile(r"^\s{4}(\w+): [^#]*?(?:#\s*(.*))?$")
COMMENT_LINE = re.compile(r"^\s{4}#\s?(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the one on its line, or the comment lines right above it."""
    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        if match := COMMENT_LINE.match(line):
            pending.append(match.group(1))
        elif match := FIELD_LINE.match(line):
            comments[match.group(1)] = " ".join(pending + [match.group(2) or ""]).strip()
            pending = []
        else:
            pending = []
    return comments


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value == MISSING:
        return "(required)"
    return f"`{value!r}`" if not dataclasses.is_dataclass(value) else ""


def section(cls: type, prefix: str, lines: list[str]) -> None:
    comments = field_comments(cls)
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        default = default_of(field)
        nested_type = _dataclass_type(cls, field)
        if nested_type is not None and not default.startswith("`["):
            nested.append((nested_type, key))
            continue
        rows.append(f"| `{key}` | {default} | {comments.get(field.name, '').replace('|', '&#124;')} |")
    if rows:
        title = prefix.rstrip(".") or "top level"
        lines += [f"### `{title}`", "", "| key | default | meaning |", "|---|---|---|", *rows, ""]
    for nested_type, key in nested:
        section(nested_type, key + ".", lines)


def _dataclass_type(cls: type, field: dataclasses.Field) -> type | None:
    hints = inspect.get_annotations(cls, eval_str=True)
    hint = hints.get(field.name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the config dataclasses by `scripts/config_reference.py`; do not edit by hand.",
        "Every key can be set in YAML or as a `key=value` override on the command line.",
        "Defaults written `${...}` are taken from the key they name.",
        "",
    ]
    section(RunConfig, "", lines)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/config.md is out of date")
    text = render()
    if parser.parse_args().check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
