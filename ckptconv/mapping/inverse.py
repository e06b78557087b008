"""Inverting a rule: sources and targets swap, transforms invert in reverse
order; what loses information (drop, slice, sum, re:, unused captures, ties)
cannot be inverted and says why."""
from __future__ import annotations

from ..errors import MappingError
from .parse import Capture, Guard, Pattern, Rule, Template, parse_rule
from .syntax import ErrorAt
from .transforms import Cast, Drop, Transform, make_transform

def invert_rule(r: Rule) -> Rule:
    where = f"{r.where}: '{r}'"
    if any(s.is_regex for s in r.sources):
        raise MappingError(f"{where}: a re: rule cannot be inverted")
    if r.is_drop:
        raise MappingError(f"{where}: dropped keys cannot be brought back")
    err = ErrorAt(f"inverse of {r.origin}", r.line, "")
    kinds = dict(r.sources[0].captures) if r.sources else {}
    used = {c for t in r.targets for c in t.captures}
    lost = [c for c in kinds if c not in used]
    if lost and not r.add:
        raise MappingError(f"{where}: the targets do not use {{{lost[0]}}}, so it cannot be inverted")

    def as_source(t: Template) -> Pattern:
        text = "".join(str(Capture(p.name, kinds.get(p.name, "one"))) if isinstance(p, Capture) else p
                       for p in t.parts)
        return Pattern(text, 1, err)

    def as_target(p: Pattern) -> Template:
        text = "".join("{" + x.name + "}" if isinstance(x, Capture) else x for x in p.parts)
        return Template(text, 1, err)

    new_sources = [as_source(t) for t in r.targets]
    if r.add:  # what was added goes away again
        return Rule(new_sources, [], [make_transform(Drop)], None, False, r.line, f"inverse of {r.origin}")
    if len(r.targets) > 1 and not any(not t.elementwise for t in r.transforms):
        raise MappingError(f"{where}: a tie (one tensor under several names) cannot be inverted")
    transforms: list[Transform] = []
    for t in reversed(r.transforms):
        try:
            transforms.extend(t.inverse())
        except MappingError as e:
            raise MappingError(f"{where}: {e}") from None
    guard = None
    if r.guard:
        conds = []
        for what, op, value in r.guard.conds:
            if what == "dtype":
                casts = [t for t in r.transforms if isinstance(t, Cast)]
                if casts:
                    if op != "==":
                        continue
                    value = casts[-1].dtype.name
            if what == "ndim":
                nd: int | None = value
                for t in r.transforms:
                    nd = t.ndim_after(nd)
                if nd is None or op != "==":
                    continue
                value = nd
            conds.append((what, op, value))
        guard = Guard(conds) if conds else None
    inv = Rule(new_sources, [as_target(s) for s in r.sources], transforms, guard, False,
               r.line, f"inverse of {r.origin}")
    try:  # the checks a written rule gets (captures, tensor counts)
        parse_rule(str(inv), r.line, inv.origin)
    except MappingError as e:
        raise MappingError(f"{where}: cannot be inverted: {e}") from None
    return inv
