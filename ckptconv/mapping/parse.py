"""Parsing rules text: patterns (``{x}``, ``{x*}``, ``{x?}``, ``re:``),
target templates, guards (``if ndim == 4``), rules and stages (``---``).
Errors point at ``FILE:LINE:COL``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import dtypes as _dt
from ..errors import CkptconvError
from ..tensor import TensorRef
from .syntax import (NAME_RE, SEP, ErrorAt, normalize_separators, parse_args, split_top_level,
                     strip_comment, strip_with_offset)
from .transforms import TRANSFORMS, Drop, Transform, Zeros

# --- patterns ---------------------------------------------------------------------------

@dataclass
class Capture:
    name: str
    kind: str  # "one" | "multi" | "opt"

    def regex(self) -> str:
        if self.kind == "one":
            return rf"(?P<{self.name}>[^./]+)"
        if self.kind == "opt":
            return rf"(?P<{self.name}>[^./]*)"
        return rf"(?P<{self.name}>[^./]+(?:[./][^./]*)*)"

    def __str__(self):
        return "{" + self.name + {"one": "", "multi": "*", "opt": "?"}[self.kind] + "}"


_CAPTURE_RE = re.compile(r"\{([^{}]*)\}")


def parse_parts(text: str, col0: int, err: ErrorAt) -> list:
    """Literal text and ``{captures}`` of a pattern."""
    parts: list = []
    pos = 0
    for m in _CAPTURE_RE.finditer(text):
        lit = text[pos:m.start()]
        for ch in "{}":
            if ch in lit:
                raise err(col0 + pos + lit.index(ch), f"unbalanced '{ch}' in pattern")
        if lit:
            parts.append(lit)
        inner = m.group(1)
        kind = "one"
        if inner.endswith("*"):
            kind, inner = "multi", inner[:-1]
        elif inner.endswith("?"):
            kind, inner = "opt", inner[:-1]
        if not NAME_RE.fullmatch(inner):
            raise err(col0 + m.start(), f"bad capture {m.group(0)!r}: use {{name}}, {{name*}} or {{name?}}")
        if parts and isinstance(parts[-1], Capture):
            raise err(col0 + m.start(), "two captures next to each other are ambiguous")
        parts.append(Capture(inner, kind))
        pos = m.end()
    lit = text[pos:]
    for ch in "{}":
        if ch in lit:
            raise err(col0 + pos + lit.index(ch), f"unbalanced '{ch}' in pattern")
    if lit:
        parts.append(lit)
    return parts


class Pattern:
    """A source pattern: literal segments and captures, or ``re:`` + a regex."""

    def __init__(self, text: str, col: int, err: ErrorAt):
        self.text, self.col = text, col
        self.is_regex = text.startswith("re:")
        if self.is_regex:
            try:
                self.regex = re.compile(text[3:])
            except re.error as e:
                raise err(col + 3 + (e.pos or 0), f"bad regular expression: {e.msg}") from None
            self.parts: list = []
            self.captures = {str(i): "one" for i in range(1, self.regex.groups + 1)}
            self.captures.update({k: "one" for k in self.regex.groupindex})
            return
        if not text:
            raise err(col, "empty pattern")
        self.parts = parse_parts(text, col, err)
        self.captures: dict[str, str] = {}
        rx = []
        for p in self.parts:
            if isinstance(p, Capture):
                if p.name in self.captures:
                    if self.captures[p.name] != p.kind:
                        raise err(col, f"capture {{{p.name}}} is used with two kinds")
                    rx.append(f"(?P={p.name})")
                else:
                    self.captures[p.name] = p.kind
                    rx.append(p.regex())
            else:
                rx.append("".join("[./]" if ch in SEP else re.escape(ch) for ch in p))
        self.regex = re.compile("".join(rx))

    def match(self, name: str) -> dict | None:
        if self.is_regex:
            m = self.regex.search(name)
            if m is None:
                return None
            caps = {str(i): g for i, g in enumerate(m.groups(), 1)}
            caps.update(m.groupdict())
            caps["__match__"] = m
            return caps
        m = self.regex.fullmatch(name)
        return None if m is None else m.groupdict()

    def fill(self, caps: dict) -> str:
        """This pattern with the captures filled in (its own separators)."""
        return "".join(caps[p.name] if isinstance(p, Capture) else p for p in self.parts)

    def __str__(self):
        return self.text


class Template:
    """A target pattern: literal text and captures to substitute."""

    def __init__(self, text: str, col: int, err: ErrorAt, regex_source: Pattern | None = None):
        self.text, self.col = text, col
        if not text:
            raise err(col, "empty target")
        self.regex_source = regex_source
        if regex_source is not None:
            # re: targets use \1, \g<name> (Python's Match.expand)
            for m in re.finditer(r"\\(\d+)|\\g<(\w+)>", text):
                ref = m.group(1) or m.group(2)
                if ref not in regex_source.captures and not (ref.isdigit() and int(ref) == 0):
                    raise err(col + m.start(), f"target refers to group {ref!r} the regex does not have")
            self.parts = []
            return
        self.parts = parse_parts(text, col, err)
        for p in self.parts:
            if isinstance(p, Capture) and p.kind == "opt":
                p.kind = "one"  # kinds come from the source; a target only names them
        seps = [ch for p in self.parts if isinstance(p, str) for ch in p if ch in SEP]
        self._default_sep = seps[0] if seps else None
        # the separator written next to each capture
        self._seps = []
        for i, p in enumerate(self.parts):
            sep = None
            if isinstance(p, Capture):
                before = self.parts[i - 1] if i > 0 else ""
                after = self.parts[i + 1] if i + 1 < len(self.parts) else ""
                if isinstance(before, str) and before and before[-1] in SEP:
                    sep = before[-1]
                elif isinstance(after, str) and after and after[0] in SEP:
                    sep = after[0]
                else:
                    sep = self._default_sep
            self._seps.append(sep)

    @property
    def captures(self) -> list[str]:
        return [p.name for p in self.parts if isinstance(p, Capture)]

    def render(self, caps: dict) -> str:
        if self.regex_source is not None:
            return caps["__match__"].expand(self.text)
        out = []
        for p, sep in zip(self.parts, self._seps):
            if isinstance(p, Capture):
                v = caps[p.name]
                if sep is not None:
                    v = re.sub(r"[./]", sep, v)
                out.append(v)
            else:
                out.append(p)
        return "".join(out)

    def __str__(self):
        return self.text


@dataclass
class Guard:
    """``if ndim == 4 and dtype == float32``."""

    conds: list[tuple[str, str, Any]]

    _OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}

    @classmethod
    def parse(cls, text: str, col: int, err: ErrorAt) -> "Guard":
        conds = []
        pos = 0
        for piece in re.split(r"(\s+and\s+)", text):
            if re.fullmatch(r"\s+and\s+", piece):
                pos += len(piece)
                continue
            m = re.fullmatch(r"\s*(ndim|dtype)\s*(==|!=|<=|>=|<|>)\s*([A-Za-z0-9_]+)\s*", piece)
            if not m:
                raise err(col + pos, f"bad condition {piece.strip()!r}: use ndim == 4 or dtype == float16")
            what, op, value = m.groups()
            if what == "ndim":
                if not value.isdigit():
                    raise err(col + pos + m.start(3), f"ndim compares with an integer, not {value!r}")
                conds.append((what, op, int(value)))
            else:
                if op not in ("==", "!="):
                    raise err(col + pos + m.start(2), "dtype compares with == or !=")
                try:
                    conds.append((what, op, _dt.get(value).name))
                except CkptconvError as e:
                    raise err(col + pos + m.start(3), str(e)) from None
            pos += len(piece)
        return cls(conds)

    def ok(self, ref: TensorRef) -> bool:
        for what, op, value in self.conds:
            have = len(ref.shape) if what == "ndim" else ref.dtype.name
            if not self._OPS[op](have, value):
                return False
        return True

    def __str__(self):
        return "if " + " and ".join(f"{w} {op} {v}" for w, op, v in self.conds)


# --- rules ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Rule:
    sources: list[Pattern]
    targets: list[Template]
    transforms: list[Transform]
    guard: Guard | None = None
    add: bool = False
    line: int = 0
    origin: str = "<rules>"

    @property
    def is_drop(self) -> bool:
        return not self.targets

    @property
    def where(self) -> str:
        return f"{self.origin}:{self.line}"

    def members(self, j: int, name: str, caps: dict, norm_index: dict[str, str]) -> list[str] | None:
        """The keys of a many-to-one rule whose source ``j`` matched ``name``."""
        if len(self.sources) == 1:
            return [name]
        out = []
        for k, pat in enumerate(self.sources):
            if k == j:
                out.append(name)
                continue
            found = norm_index.get(normalize_separators(pat.fill(caps)))
            if found is None:
                return None
            out.append(found)
        return out if len(set(out)) == len(out) else None

    def run(self, refs: list[TensorRef]) -> list[TensorRef]:
        for t in self.transforms:
            if t.elementwise:
                refs = [t.one(r) for r in refs]
            else:
                refs = t.apply(refs, len(self.targets))
        return refs

    def __str__(self) -> str:
        src = ", ".join(str(s) for s in self.sources)
        if self.add and not self.sources:
            text = f"add {self.targets[0]} = " + " | ".join(str(t) for t in self.transforms)
        else:
            tgt = ", ".join(str(t) for t in self.targets) if self.targets else "drop"
            trs = [str(t) for t in self.transforms if not isinstance(t, Drop)]
            text = ("add " if self.add else "") + f"{src} -> {tgt}" + "".join(f" | {t}" for t in trs)
        if self.guard:
            text += f"  {self.guard}"
        return text


def _parse_transform(piece: str, col: int, err: ErrorAt) -> Transform:
    m = re.fullmatch(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", piece, re.S)
    if not m:
        raise err(col, f"bad transform {piece!r}: expected name or name(args)")
    name = m.group(1)
    if name not in TRANSFORMS:
        raise err(col, f"unknown transform '{name}' (known: {', '.join(TRANSFORMS)})")
    args, kwargs = ([], {}) if m.group(2) is None else parse_args(m.group(2), col + m.start(2), err)
    return TRANSFORMS[name](args, kwargs, col, err)


def parse_rule(line: str, lineno: int, origin: str) -> Rule | None:
    """One line of a rules file (None for blank lines and comments)."""
    err = ErrorAt(origin, lineno, line)
    body = strip_comment(line)
    if not body.strip():
        return None
    text, off = strip_with_offset(body, 0)
    add = False
    m = re.match(r"add\s+", text)
    if m and "->" not in text[:m.end()]:
        add, text, off = True, text[m.end():], off + m.end()
        if "->" not in text and "=" in text:
            return _parse_constant(text, off, err, lineno, origin)
    arrow = text.find("->")
    if arrow < 0:
        raise err(off + len(text) + 1, "expected '->' between sources and targets")
    left, right = text[:arrow], text[arrow + 2:]
    lcol, rcol = off + 1, off + arrow + 3  # 1-based columns
    # sources
    ltext, lc = strip_with_offset(left, lcol)
    if not ltext:
        raise err(lcol, "no source pattern before '->'")
    if ltext.startswith("re:"):
        sources = [Pattern(ltext, lc, err)]
    else:
        sources = []
        for piece, o in split_top_level(left, ","):
            p, c = strip_with_offset(piece, lcol + o)
            if not p:
                raise err(c, "empty source pattern")
            if p.startswith("re:"):
                raise err(c, "a re: source must be the only source of its rule")
            sources.append(Pattern(p, c, err))
        caps0 = set(sources[0].captures)
        for s in sources[1:]:
            if set(s.captures) != caps0:
                raise err(s.col, "every source of a rule must use the same captures "
                                 f"({', '.join(sorted(caps0)) or 'none'})")
    # guard at the end: "... if ndim == 4"
    guard = None
    gm = re.search(r"\s+if\s+(.*)$", right)
    if gm:
        guard = Guard.parse(gm.group(1), rcol + gm.start(1), err)
        right = right[:gm.start()]
    pieces = split_top_level(right, "|")
    tpiece, to = pieces[0]
    tcol = rcol + to
    transforms = []
    for piece, o in pieces[1:]:
        p, c = strip_with_offset(piece, rcol + o)
        if not p:
            raise err(c, "empty transform after '|'")
        transforms.append(_parse_transform(p, c, err))
    targets: list[Template] = []
    ttext, tc = strip_with_offset(tpiece, tcol)
    if not ttext:
        raise err(tc, "no target after '->' (write 'drop' to drop keys)")
    if ttext != "drop":
        regex_src = sources[0] if sources[0].is_regex else None
        for piece, o in split_top_level(tpiece, ","):
            p, c = strip_with_offset(piece, tcol + o)
            if not p:
                raise err(c, "empty target pattern")
            t = Template(p, c, err, regex_src)
            for name in t.captures:
                if name not in sources[0].captures:
                    raise err(c, f"target uses {{{name}}}, which no source captures")
            targets.append(t)
    # drop: only as the last step, with no targets
    drops = [t for t in transforms if isinstance(t, Drop)]
    if drops:
        if transforms[-1] is not drops[0] or len(drops) > 1:
            raise err(drops[0].col, "drop must be the last transform")
        if targets:
            raise err(tc, "a dropping rule has no targets: write 'SOURCE -> drop'")
    if not targets and transforms and not drops:
        raise err(transforms[0].col, "a dropping rule takes no transforms")
    if add and not targets:
        raise err(tc, "an add rule needs a target")
    # static check of how many tensors come out
    n = len(sources)
    for t in transforms:
        try:
            n = t.count(n, len(targets))
        except ValueError as e:
            raise err(t.col, str(e)) from None
    if targets and n != len(targets) and n != 1:
        raise err(tc, f"the rule makes {n} tensors for {len(targets)} targets")
    if not targets and n not in (0, len(sources)):
        raise err(tc, f"the rule makes {n} tensors and has no target")
    return Rule(sources, targets, transforms, guard, add, lineno, origin)


def _parse_constant(text: str, off: int, err: ErrorAt, lineno: int, origin: str) -> Rule:
    """``add NAME = zeros(shape=[2, 3], dtype=float16) | ...``"""
    eq = text.index("=")
    name, ncol = strip_with_offset(text[:eq], off + 1)
    if not name or re.search(r"[{}\s]", name):
        raise err(ncol, f"bad name for an added tensor: {name!r}")
    pieces = split_top_level(text[eq + 1:], "|")
    transforms = []
    for piece, o in pieces:
        p, c = strip_with_offset(piece, off + eq + 2 + o)
        if not p:
            raise err(c, "empty transform")
        transforms.append(_parse_transform(p, c, err))
    first = transforms[0]
    if not isinstance(first, Zeros) or first.shape is None:
        raise err(first.col, "an added constant starts with zeros(shape...) or ones(shape...)")
    if any(not t.elementwise for t in transforms):
        raise err(first.col, "an added constant takes only one-tensor transforms")
    return Rule([], [Template(name, ncol, err)], transforms, None, True, lineno, origin)


def parse_stages(text: str, name: str = "<rules>") -> list[list[Rule]]:
    """The rules of each stage of ``text`` (a line ``---`` starts a new stage)."""
    stages: list[list[Rule]] = [[]]
    for i, line in enumerate(text.splitlines(), 1):
        if strip_comment(line).strip() == "---":
            stages.append([])
            continue
        rule = parse_rule(line, i, name)
        if rule is not None:
            stages[-1].append(rule)
    return stages
