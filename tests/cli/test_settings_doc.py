"""docs/settings.md lists every `PREFLOOP_*` variable the code reads, and no other.

Two sources of truth are compared with the doc's table:
- `app.settings.Settings`: each field is `PREFLOOP_<FIELD>` (pydantic reads it through the
  prefix, so no literal name appears in the code); its type (with the field's bounds) and its
  default must match the table's columns exactly, as `settings_row` renders them.
- every literal `PREFLOOP_<NAME>` in the code, scripts, Docker files, benchmarks and tests
  (os.environ reads, typer `envvar=`, shell and compose variables): each must have a row.
A row naming a variable that nothing reads fails too, so the doc cannot keep a stale entry.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "settings.md"
# Where a PREFLOOP_ variable can be read or set; docs/ (the doc itself, README-style mentions)
# and generated or vendored folders are not code.
SCANNED = ("app", "store", "loop", "training", "feedback", "labeling", "scripts", "docker",
           "benchmarks", "tests", "cli.py", "pyproject.toml")
SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".env", ".example", ".cfg", ".ini"}
NAME = re.compile(r"\bPREFLOOP_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
ROW = re.compile(r"^\| `(PREFLOOP_[A-Z0-9_]+)` \| (.*?) \| (.*?) \| (.*?) \| (.+) \|$")
LONG_DEFAULT = 80  # longer (or multi-line) defaults are named, not quoted, in the table


def _code_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
            continue
        files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix in SUFFIXES or "Dockerfile" in p.name)]
    return sorted(set(files) - {Path(__file__).resolve()})


def names_in_code() -> dict[str, list[str]]:
    """Each literal PREFLOOP_* name in the code -> the files that mention it."""
    found: dict[str, list[str]] = {}
    for path in _code_files():
        for name in set(NAME.findall(path.read_text(encoding="utf-8", errors="replace"))):
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def _type(annotation: Any, metadata: list[Any]) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _type(args[0], metadata)  # Optional: unset is the default column's business
    if typing.get_origin(annotation) is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    base = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path",
            SecretStr: "secret string"}[annotation]
    bounds = []
    for item in metadata:
        for kind, attribute, symbol in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"),
                                        (Lt, "lt", "<")):
            if isinstance(item, kind):
                bounds.append(f"{symbol} {_number(getattr(item, attribute))}")
    return " ".join([base, ", ".join(bounds)]) if bounds else base


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    text = str(value)
    if text == "":
        return "empty"
    if "\n" in text or len(text) > LONG_DEFAULT:
        return "built-in text"
    return f"`{text}`"


def settings_row(field: str) -> tuple[str, str]:
    """(type, default) of a Settings field as the doc's table spells them."""
    info = Settings.model_fields[field]
    return _type(info.annotation, info.metadata), _default(info.default)


def doc_rows() -> dict[str, tuple[str, str, str, str]]:
    rows: dict[str, tuple[str, str, str, str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if match := ROW.match(line):
            name, *columns = match.groups()
            assert name not in rows, f"{name} has two rows in docs/settings.md"
            rows[name] = (columns[0], columns[1], columns[2], columns[3])
    return rows


def test_every_variable_read_in_the_code_has_a_row():
    documented = doc_rows()
    missing = {name: files for name, files in sorted(names_in_code().items())
               if name not in documented}
    missing |= {f"PREFLOOP_{field.upper()}": ["app/settings.py"]
                for field in Settings.model_fields
                if f"PREFLOOP_{field.upper()}" not in documented}
    assert missing == {}, f"add these to docs/settings.md: {missing}"


def test_every_row_names_a_variable_something_reads():
    read = set(names_in_code()) | {f"PREFLOOP_{f.upper()}" for f in Settings.model_fields}
    assert sorted(set(doc_rows()) - read) == []


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_a_settings_row_has_the_fields_type_and_default(field):
    kind, default, read_by, what = doc_rows()[f"PREFLOOP_{field.upper()}"]
    assert (kind, default) == settings_row(field)
    assert read_by == "`app/settings.py`" and what.strip()


def test_each_other_row_names_files_that_read_it():
    found = names_in_code()
    settings = {f"PREFLOOP_{f.upper()}" for f in Settings.model_fields}
    for name, (_kind, _default, read_by, _what) in doc_rows().items():
        if name in settings:
            continue
        files = re.findall(r"`([^`]+)`", read_by)
        assert files, f"{name}: the read-by column names no file"
        assert sorted(set(files) - set(found.get(name, []))) == [], name


def test_the_scan_sees_the_readers_outside_settings():
    """The scan itself: names read only through os.environ / envvar= / shell are found."""
    found = names_in_code()
    assert "training/models.py" in found["PREFLOOP_CACHE_DIR"]
    assert "loop/commands.py" in found["PREFLOOP_RUNS_DIR"]
    assert "docker/app-entrypoint.sh" in found["PREFLOOP_APP_WORKERS"]
    assert "tests/conftest.py" in found["PREFLOOP_TEST_PG_URL"]
    assert settings_row("overlap") == ("integer ≥ 1, ≤ 50", "`1`")
    assert settings_row("serving") == ("`hf` / `upstream` / `off`", "`hf`")
    assert settings_row("guidelines") == ("string", "built-in text")
