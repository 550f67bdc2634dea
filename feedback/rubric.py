"""Rubrics: versioned prompt templates for LLM judges, stored as files.

A rubric file has a small header and one system + user template per task kind:

    ---
    name: default
    version: 1
    ---
    === pairwise.system ===
    You compare two responses ... $principles
    === pairwise.user ===
    $question ... $responses ... $format

Placeholders (string.Template, substituted in one pass, so candidate text is never expanded):
`$principles`, `$question`, `$reference`, `$responses`, `$format`. The rubric's name and version
are part of the judge's identity; its sha256 is recorded too, so editing a rubric without bumping
its version is caught when the judge next runs. Builtin rubrics live in feedback/rubrics/.

    prefloop judge rubrics          # the builtin rubrics, their versions and task kinds
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from types import MappingProxyType
from typing import Any

from training.config_reader import ConfigError

BUILTIN_DIR = Path(__file__).with_name("rubrics")
SECTION = re.compile(r"^=== *(pairwise|listwise|binary)\.(system|user) *===\s*$", re.MULTILINE)
ALLOWED_PLACEHOLDERS = {"principles", "question", "reference", "responses", "format"}


class RubricError(ConfigError):
    """A rubric that cannot be used; a ConfigError, since a rubric is part of a judge config."""


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    sha256: str
    # kind -> (system template, user template)
    templates: MappingProxyType[str, tuple[str, str]] = field(
        default_factory=lambda: MappingProxyType({}))

    def render(self, kind: str, **values: str) -> tuple[str, str]:
        """(system, user) for `kind` with the placeholders filled (one pass, no re-expansion)."""
        system, user = self.templates[kind]
        return Template(system).substitute(values), Template(user).substitute(values)


def parse_rubric(text: str, *, origin: str = "<rubric>") -> Rubric:
    """Parse a rubric file's text (see the module docstring for the layout)."""
    header = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if header is None:
        raise RubricError(f"{origin}: a rubric starts with a --- header --- block")
    meta: dict[str, str] = {}
    for line in header.group(1).splitlines():
        if line.strip():
            key, sep, value = line.partition(":")
            if not sep:
                raise RubricError(f"{origin}: bad header line {line!r}")
            meta[key.strip()] = value.strip()
    name, version = meta.get("name", ""), meta.get("version", "")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", name):
        raise RubricError(f"{origin}: header needs name: (letters, digits, _ . -)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,30}", version):
        raise RubricError(f"{origin}: header needs version:")
    body = text[header.end():]
    parts = SECTION.split(body)
    sections: dict[tuple[str, str], str] = {}
    # parts = [preamble, kind, role, text, kind, role, text, ...]
    for i in range(1, len(parts), 3):
        key = (parts[i], parts[i + 1])
        if key in sections:
            raise RubricError(f"{origin}: section {key[0]}.{key[1]} appears twice")
        sections[key] = parts[i + 2].strip("\n")
    templates: dict[str, tuple[str, str]] = {}
    for kind in ("pairwise", "listwise", "binary"):
        system, user = sections.get((kind, "system")), sections.get((kind, "user"))
        if system is None and user is None:
            continue
        if system is None or user is None:
            raise RubricError(f"{origin}: {kind} needs both a system and a user section")
        for template in (system, user):
            _check_placeholders(Template(template), origin)
        if "$responses" not in user:
            raise RubricError(f"{origin}: {kind}.user must place $responses")
        templates[kind] = (system, user)
    if not templates:
        raise RubricError(f"{origin}: no === kind.system === / === kind.user === sections")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Rubric(name=name, version=version, sha256=digest,
                  templates=MappingProxyType(templates))


def _check_placeholders(template: Template, origin: str) -> None:
    for match in template.pattern.finditer(template.template):
        named = match.group("named") or match.group("braced")
        if match.group("invalid") is not None:
            raise RubricError(f"{origin}: a lone $ (write $$ for a dollar sign)")
        if named is not None and named not in ALLOWED_PLACEHOLDERS:
            raise RubricError(f"{origin}: unknown placeholder ${named}")


def load_rubric(ref: str, *, base_dir: Path | None = None) -> Rubric:
    """A builtin rubric by name (e.g. `default_v1`) or a rubric file by path."""
    path: Path
    if "/" in ref or ref.endswith((".md", ".txt")):
        path = Path(ref) if Path(ref).is_absolute() else (base_dir or Path.cwd()) / ref
    else:
        path = BUILTIN_DIR / f"{ref}.md"
    if not path.is_file():
        builtin = sorted(p.stem for p in BUILTIN_DIR.glob("*.md"))
        raise RubricError(f"rubric {ref!r} not found (builtin: {', '.join(builtin)})")
    return parse_rubric(path.read_text(encoding="utf-8"), origin=str(path))


def builtin_rubrics() -> dict[str, Any]:
    return {p.stem: load_rubric(p.stem) for p in sorted(BUILTIN_DIR.glob("*.md"))}
