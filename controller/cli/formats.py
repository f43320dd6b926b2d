"""``-o json`` and ``-o yaml``: what a list or show command prints as data, kubectl style.

``table`` (the default) and ``wide`` are each command's own text; ``json`` and
``yaml`` are the API's answer as it came, so a script reads the same fields the
API documents. YAML is written here rather than by a library: the answers are
plain JSON values, and a YAML emitter for those is a few lines, where a runtime
dependency would be one more thing to install with every CLI. Strings that a
YAML reader could take for something else (``yes``, ``null``, a number, a
date) are double-quoted, with JSON's escapes, which YAML shares.
"""

from __future__ import annotations

import json
import re
from typing import Any

FORMATS = ("table", "wide", "json", "yaml")
DATA_FORMATS = ("json", "yaml")

# A string YAML reads back as that string without quotes: it starts with a letter and
# holds no character YAML gives a meaning to (':', '#', ' ', ...), and is not a word a
# YAML 1.1 reader takes for a boolean or null.
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def print_data(body: Any, fmt: str) -> bool:
    """Print ``body`` as ``fmt`` if that is a data format (True); False for table and wide,
    which the command prints itself."""
    if fmt == "json":
        print(json.dumps(body, indent=2))
    elif fmt == "yaml":
        print("\n".join(yaml_lines(body)))
    else:
        return False
    return True


def yaml_lines(value: Any, indent: str = "") -> list[str]:
    """``value`` (what ``json.loads`` returns) as block-style YAML lines."""
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            if _is_block(item):
                lines.append(f"{indent}{_scalar(str(key))}:")
                lines += yaml_lines(item, indent + "  ")
            else:
                lines.append(f"{indent}{_scalar(str(key))}: {_scalar(item)}")
        return lines
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            if _is_block(item):  # "- " then the item's first line; the rest indented under it
                first, *rest = yaml_lines(item, indent + "  ")
                lines += [f"{indent}- {first[len(indent) + 2:]}", *rest]
            else:
                lines.append(f"{indent}- {_scalar(item)}")
        return lines
    return [indent + _scalar(value)]


def _is_block(value: Any) -> bool:
    return isinstance(value, dict | list) and bool(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # YAML 1.1 readers want a '.' in a float: 1.0e-06, not 1e-06
        mantissa, e, exponent = json.dumps(value).partition("e")
        return mantissa + ("" if "." in mantissa or not e else ".0") + e + exponent
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"  # only empty ones get here
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return _quoted(text)


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar: every character that is not printable as it is escaped."""
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)
