"""The rules language's small pieces: error locations, transform arguments,
comments and top-level splitting (shared by the parser and the transforms)."""
from __future__ import annotations

import re

from ..errors import MappingError

SEP = "./"
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def normalize_separators(name: str) -> str:
    """A name with both separators written as '.', for sibling look-ups."""
    return name.replace("/", ".")


class ErrorAt:
    """Builds 'FILE:LINE:COL: message' errors."""

    def __init__(self, origin: str, line: int, text: str):
        self.origin, self.line, self.text = origin, line, text

    def __call__(self, col: int, message: str) -> MappingError:
        return MappingError(f"{self.origin}:{self.line}:{col}: {message}")


# --- transform arguments --------------------------------------------------------

_ARG_TOKEN = re.compile(r"""\s*(?:
    (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?inf\b|nan\b)
  | (?P<str>'[^']*'|"[^"]*")
  | (?P<id>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<p>[\[\](),=])
  | (?P<bad>\S))""", re.X)


def parse_args(text: str, col0: int, err: ErrorAt) -> tuple[list, dict]:
    """Arguments of a transform: numbers, names, strings, [lists], key=value."""
    toks = []
    for m in _ARG_TOKEN.finditer(text):
        if m.group("bad"):
            raise err(col0 + m.start("bad"), f"unexpected character {m.group('bad')!r} in arguments")
        kind = m.lastgroup
        toks.append((kind, m.group(kind), col0 + m.start(kind)))
    toks.append(("end", "", col0 + len(text)))
    pos = 0

    def peek():
        return toks[pos]

    def value():
        nonlocal pos
        kind, v, col = toks[pos]
        pos += 1
        if kind == "num":
            f = float(v)
            return int(v) if re.fullmatch(r"[-+]?\d+", v) else f
        if kind == "str":
            return v[1:-1]
        if kind == "id":
            return None if v == "None" else v
        if kind == "p" and v in "[(":
            close = "]" if v == "[" else ")"
            items = []
            if peek()[1] == close:
                pos += 1
                return items
            while True:
                items.append(value())
                k2, v2, c2 = toks[pos]
                pos += 1
                if v2 == close:
                    return items
                if v2 != ",":
                    raise err(c2, f"expected ',' or '{close}'")
        raise err(col, f"expected a value, found {v or 'end of arguments'!r}")

    args, kwargs = [], {}
    if peek()[0] == "end":
        return args, kwargs
    while True:
        kind, v, col = peek()
        if kind == "id" and toks[pos + 1][1] == "=":
            pos += 2
            kwargs[v] = value()
        else:
            if kwargs:
                raise err(col, "positional argument after key=value")
            args.append(value())
        kind, v, col = toks[pos]
        pos += 1
        if kind == "end":
            return args, kwargs
        if v != ",":
            raise err(col, f"expected ',' between arguments, found {v!r}")


def format_arg(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_arg(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def split_top_level(text: str, sep: str) -> list[tuple[str, int]]:
    """Split on ``sep`` outside brackets; (piece, offset) pairs."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append((text[start:i], start))
            start = i + 1
    out.append((text[start:], start))
    return out


def strip_with_offset(piece: str, off: int) -> tuple[str, int]:
    lead = len(piece) - len(piece.lstrip())
    return piece.strip(), off + lead


def strip_comment(line: str) -> str:
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line
