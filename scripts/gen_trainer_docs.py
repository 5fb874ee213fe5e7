"""Regenerate the two reference tables of docs/trainer.md from the code: the ``fop_*`` arguments (from the
``FOPTrainingArguments`` dataclass: name, default, help text) and the logged ``fop/`` keys
(``hf_fop.integrations.trainer.LOGGED_KEYS``).

    python scripts/gen_trainer_docs.py          # rewrite the tables in place
    python scripts/gen_trainer_docs.py --check  # exit 1 if docs/trainer.md is out of date (tests run this)

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "trainer.md"


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value is None or value == []:
        return "-"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def arguments_table() -> str:
    """Markdown table of every ``fop_*`` field of :class:`FOPTrainingArguments`."""
    from hf_fop import FOPTrainingArguments

    rows = ["| argument (CLI flag) | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(FOPTrainingArguments):
        if not field.name.startswith("fop_"):
            continue
        choices = field.metadata.get("choices")
        help_text = field.metadata.get("help", "")
        if choices:
            help_text += " Choices: " + ", ".join(f"`{c}`" for c in choices) + "."
        rows.append(f"| `--{field.name}` | {_default(field)} | {_cell(help_text)} |")
    return "\n".join(rows)


def logged_keys_table() -> str:
    """Markdown table of every ``fop/`` key FOPTrainer logs."""
    from hf_fop.integrations.trainer import LOGGED_KEYS

    rows = ["| key | meaning |", "|---|---|"]
    rows += [f"| `{key}` | {_cell(meaning)} |" for key, meaning in LOGGED_KEYS.items()]
    return "\n".join(rows)


TABLES: Dict[str, Callable[[], str]] = {"fop-arguments": arguments_table, "logged-keys": logged_keys_table}


def render(text: str) -> str:
    """``text`` with every generated table replaced by its current content (a missing marker raises)."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end generated: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: the markers of table {name!r} are missing")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/trainer.md is up to date")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{DOC} is out of date: run python scripts/gen_trainer_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
