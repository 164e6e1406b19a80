"""MkDocs hook: the config reference page, generated from the config dataclasses themselves.

Each key's name, type and default are read from `audit.config` (and `TrustConfig`); its meaning
from the comment on the field's line in the class, else from the comment on the key's line in
the module's TOML example. A key with neither is a warning, which `mkdocs build --strict` turns
into a failure, so the reference cannot fall behind the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's `audit`

from audit import config as config_module
from audit.metrics.gates import GATES
from audit.metrics.trust import config as trust_module

MARKER = "<!-- config-reference -->"
TABLES = {
    "data": "[data]",
    "model": "[[model]]",
    "explain": "[explain]",
    "gates": "[gates]",
    "trust": "[trust]",
    "preprocess": "[model.preprocess]",
    "discovery": "[discovery]",
}
log = logging.getLogger("mkdocs.hooks.config_reference")

SECTIONS: list[tuple[str, type, Any]] = [
    ("top level", config_module.AuditConfig, config_module),
    ("[data]", config_module.DataConfig, config_module),
    ("[[model]]", config_module.ModelConfig, config_module),
    ("[model.preprocess]", config_module.PreprocessConfig, config_module),
    ("[explain]", config_module.ExplainConfig, config_module),
    ("[trust]", trust_module.TrustConfig, trust_module),
    ("[discovery]", config_module.DiscoveryConfig, config_module),
    ("[gates]", config_module.GateConfig, config_module),
]


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each `name: type = default` line in a class body."""
    comments: dict[str, str] = {}
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    line_name: dict[int, str] = {}
    for token in tokens:
        if token.type == tokenize.NAME and token.start[1] == 4 and token.start[0] not in line_name:
            line_name[token.start[0]] = token.string
        if token.type == tokenize.COMMENT and token.start[0] in line_name:
            comments[line_name[token.start[0]]] = token.string.lstrip("# ").strip()
    return comments


def docstring_comments(module: Any) -> dict[tuple[str, str], str]:
    """(section, key) -> comment, from the TOML example in a module's docstring."""
    found: dict[tuple[str, str], str] = {}
    section = ""
    for line in (module.__doc__ or "").splitlines():
        header = re.match(r"^\[\[?([\w.]+)\]\]?", line)
        if header:
            section = header.group(1)
            continue
        entry = re.match(r"^(\w+)\s*=.*?#\s*(.+)$", line)
        if entry:
            found[(section, entry.group(1))] = entry.group(2).strip()
    return found


def describe_type(hint: Any) -> str:
    """A short, readable name for a type hint."""
    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "None")


def default_of(field: dataclasses.Field) -> str:
    """The default as TOML would write it."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "table"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)


def section_table(title: str, cls: type, module: Any) -> str:
    """One Markdown table: key, type, default, meaning."""
    hints = typing.get_type_hints(cls)
    own = field_comments(cls)
    example = docstring_comments(module)
    key_section = title.strip("[]").split(".")[-1] if title.startswith("[") else ""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.metadata.get("internal") or field.name == "from_defaults":
            continue
        meaning = own.get(field.name) or example.get((key_section, field.name), "")
        if not meaning and field.name in TABLES:
            meaning = f"the `{TABLES[field.name]}` table below"
        if cls is config_module.GateConfig and field.name in GATES:
            gate = GATES[field.name]
            meaning = meaning or f"{gate.protects} (default {gate.default:g})"
        if not meaning:
            log.warning("config reference: %s.%s has no description", cls.__name__, field.name)
        hint = describe_type(hints[field.name])
        cells = [f"`{field.name}`", f"`{hint}`", f"`{default_of(field)}`", meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return f"### {title}\n\n" + "\n".join(rows) + "\n"


def reference() -> str:
    """Every section of the audit config as Markdown tables."""
    return "\n".join(section_table(*section) for section in SECTIONS)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the marker on the config page with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
