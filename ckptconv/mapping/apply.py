"""Applying a mapping: first-match-wins claims over the flat tensor names,
many-to-one groups, ``add`` rules, stages; the new tree keeps the old one's
structure; every application leaves a ``MappingReport``."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import CkptconvError, MappingError, UsageError
from ..reports import Report, name_list
from ..tensor import TensorRef
from ..tree import Checkpoint, ObjectRecord, children, is_container, iter_leaves, join_path
from .inverse import invert_rule
from .parse import Rule, parse_stages
from .presets import preset_names, preset_text
from .syntax import normalize_separators

# --- reports ---------------------------------------------------------------------------------

@dataclass
class MappingReport(Report):
    """What one application of a mapping did."""

    mapping: str
    keys: int = 0                                          # tensor names in the input
    matched: int = 0                                       # of those, claimed by a rule
    outputs: int = 0                                       # tensor names in the output
    rules: list[dict] = field(default_factory=list)        # {"rule", "where", "used"}
    unmatched: list[str] = field(default_factory=list)     # passed through unchanged
    dropped: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    renamed: dict[str, list[str]] = field(default_factory=dict)  # old -> new names

    @property
    def unused_rules(self) -> list[str]:
        return [f"{r['where']}: {r['rule']}" for r in self.rules if not r["used"]]

    def to_dict(self) -> dict:
        return {"mapping": self.mapping, "keys": self.keys, "matched": self.matched,
                "outputs": self.outputs, "rules": self.rules, "unmatched": self.unmatched,
                "unused_rules": self.unused_rules, "dropped": self.dropped, "added": self.added,
                "renamed": self.renamed}

    def __str__(self) -> str:
        used = sum(1 for r in self.rules if r["used"])
        lines = [f"mapping {self.mapping}: {self.matched} of {self.keys} keys matched by "
                 f"{used} of {len(self.rules)} rules -> {self.outputs} tensors"
                 + (f", {len(self.dropped)} dropped" if self.dropped else "")
                 + (f", {len(self.added)} added" if self.added else "")]
        for r in self.rules:
            lines.append(f"  {r['used']:6d}x  {r['where']}: {r['rule']}")
        if self.unmatched:
            lines.append(f"  unmatched (passed through): {name_list(self.unmatched)}")
        if self.unused_rules:
            lines.append(f"  unused rules: {len(self.unused_rules)}")
        return "\n".join(lines)


# --- applying ---------------------------------------------------------------------------------

class _Removed:
    def __repr__(self):
        return "<removed>"


_REMOVED = _Removed()


class _Claims:
    """First-match-wins over the flat names, with many-to-one groups."""

    def __init__(self, rules: list[Rule], tensors: dict[str, TensorRef]):
        self.rules = rules
        self.tensors = tensors
        self.norm: dict[str, str] = {}
        for n in tensors:
            self.norm.setdefault(normalize_separators(n), n)
        self._first: dict[str, Any] = {}

    def first(self, name: str, start: int = 0):
        """(rule index, captures, member names) of the first rule from ``start``
        one of whose sources matches ``name`` with its siblings present."""
        if start == 0 and name in self._first:
            return self._first[name]
        hit = None
        for ri in range(start, len(self.rules)):
            rule = self.rules[ri]
            for j, pat in enumerate(rule.sources):
                caps = pat.match(name)
                if caps is None:
                    continue
                members = rule.members(j, name, caps, self.norm)
                if members is None:
                    continue
                if rule.guard and not all(rule.guard.ok(self.tensors[m]) for m in members):
                    continue
                if j != 0:  # captures as the first source sees them
                    caps = rule.sources[0].match(members[0]) or caps
                hit = (ri, caps, members)
                break
            if hit:
                break
        if start == 0:
            self._first[name] = hit
        return hit

    def claim(self, name: str, claimed: dict):
        start = 0
        while start < len(self.rules):
            hit = self.first(name, start)
            if hit is None:
                return None
            ri, caps, members = hit
            ok = not any(m in claimed for m in members)
            if ok and len(members) > 1:
                for m in members:
                    if m != name:
                        other = self.first(m)
                        if other is None or other[0] != ri or other[2] != members:
                            ok = False
                            break
            if ok:
                return hit
            start = ri + 1
        return None


class Mapping:
    """A parsed rule set (or a chain of them); ``apply`` maps a Checkpoint."""

    def __init__(self, rules: list[Rule], name: str = "<rules>", stages: list["Mapping"] | None = None):
        self.rules = list(rules)
        self.name = name
        self.stages = list(stages) if stages else None
        self.report: MappingReport | None = None

    # -- construction --
    @classmethod
    def parse(cls, text: str, name: str = "<rules>") -> "Mapping":
        """Rules text; a line ``---`` starts a new stage that maps the previous
        stage's output (the result is a chain)."""
        stages = parse_stages(text, name)
        if len(stages) == 1:
            return cls(stages[0], name)
        return cls([], name, [cls(rules, f"{name} stage {k}") for k, rules in enumerate(stages, 1)])

    @classmethod
    def preset(cls, name: str) -> "Mapping":
        text = preset_text(name)
        return cls.parse(text, f"{name}.rules")

    @classmethod
    def load(cls, spec: str | Path) -> "Mapping":
        """A preset name, a path to a rules file, or rules text."""
        s = str(spec)
        if "\n" not in s and "->" not in s and s in preset_names():
            return cls.preset(s)
        p = Path(s)
        if "\n" not in s and p.is_file():
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise MappingError(f"{p.name}: cannot read rules file: {e}") from None
            return cls.parse(text, p.name)
        if "->" in s or ("=" in s and s.lstrip().startswith("add")):
            return cls.parse(s)
        raise UsageError(f"--map '{s}': not a preset, a rules file or rules text; "
                         f"presets: {', '.join(preset_names())}")

    @classmethod
    def chain(cls, mappings: Sequence["Mapping"]) -> "Mapping":
        flat: list[Mapping] = []
        for m in mappings:
            flat.extend(m.stages if m.stages else [m])
        if len(flat) == 1:
            return flat[0]
        return cls([], " + ".join(m.name for m in flat), flat)

    # -- text --
    def to_text(self) -> str:
        """The rules as DSL text (stages separated by ``---``)."""
        if self.stages:
            return "---\n".join(m.to_text() for m in self.stages)
        return "".join(f"{r}\n" for r in self.rules)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self):
        return f"<Mapping {self.name}: {len(self.rules)} rules>"

    # -- application --
    def apply(self, ck: Checkpoint | dict, strict: bool = False) -> Checkpoint:
        """The mapped checkpoint (lazy; no tensor bytes are read). Sets ``self.report``."""
        if not isinstance(ck, Checkpoint):
            ck = Checkpoint.from_state_dict(ck)
        if self.stages:
            return self._apply_chain(ck, strict)
        tensors = ck.tensors()
        report = MappingReport(self.name, keys=len(tensors))
        main = [r for r in self.rules if not r.add]
        adds = [r for r in self.rules if r.add]
        uses = {id(r): 0 for r in self.rules}
        claims = _Claims(main, tensors)
        claimed: dict[str, tuple] = {}
        groups: list[tuple] = []
        for name in tensors:
            if name in claimed:
                continue
            hit = claims.claim(name, claimed)
            if hit is not None:
                for m in hit[2]:
                    claimed[m] = hit
                groups.append(hit)
        report.matched = len(claimed)
        report.unmatched = [n for n in tensors if n not in claimed]
        if strict and report.unmatched:
            raise MappingError(f"{self.name}: {len(report.unmatched)} keys match no rule "
                               f"(strict): {name_list(report.unmatched, 5)}")

        memo: dict[tuple, list[TensorRef]] = {}
        outputs: list[tuple[str, TensorRef, str]] = []  # (new name, ref, anchor name)
        origin: dict[str, str] = {}

        def emit(rule, key_refs, caps, anchor, sources_desc):
            k = (id(rule), tuple(id(r) for r in key_refs))
            if rule.is_drop:
                return []
            if k not in memo:
                try:
                    memo[k] = rule.run(list(key_refs))
                except MappingError as e:
                    raise MappingError(f"{rule.where}: {sources_desc}: {e}") from None
            outs = memo[k]
            names = [t.render(caps) for t in rule.targets]
            if len(outs) == 1 and len(names) > 1:
                outs = outs * len(names)  # one tensor, several names: a tie
            if len(outs) != len(names):
                raise MappingError(f"{rule.where}: {sources_desc}: made {len(outs)} tensors "
                                   f"for {len(names)} targets")
            for n, r in zip(names, outs):
                if n in origin:
                    raise MappingError(f"{rule.where}: {sources_desc} and {origin[n]} both map to '{n}'")
                origin[n] = sources_desc
                outputs.append((n, r, anchor))
            return names

        by_first = {g[2][0]: g for g in groups}
        for name in tensors:
            if name not in claimed:
                if name in origin:
                    raise MappingError(f"{self.name}: '{origin[name]}' maps onto '{name}', "
                                       "which is also kept unchanged")
                origin[name] = name
                outputs.append((name, tensors[name], name))
            elif name in by_first:
                ri, caps, members = by_first[name]
                rule = main[ri]
                uses[id(rule)] += 1
                desc = "'" + "', '".join(members) + "'"
                new = emit(rule, [tensors[m] for m in members], caps, name, desc)
                if rule.is_drop:
                    report.dropped.extend(members)
                else:
                    for m in members:
                        report.renamed[m] = new
            for rule in adds:
                if not rule.sources:
                    continue
                for j, pat in enumerate(rule.sources[:1]):
                    caps = pat.match(name)
                    if caps is None:
                        continue
                    members = rule.members(j, name, caps, claims.norm)
                    if members is None or (rule.guard and not all(
                            rule.guard.ok(tensors[m]) for m in members)):
                        continue
                    uses[id(rule)] += 1
                    report.added.extend(emit(rule, [tensors[m] for m in members], caps, name,
                                             f"add '{name}'"))
        for rule in adds:
            if not rule.sources:
                uses[id(rule)] += 1
                ref = rule.transforms[0].produce(None)
                for t in rule.transforms[1:]:
                    ref = t.one(ref)
                n = rule.targets[0].render({})
                if n in origin:
                    raise MappingError(f"{rule.where}: added '{n}' is already in the checkpoint")
                origin[n] = f"add '{n}'"
                outputs.append((n, ref, ""))
                report.added.append(n)
        keep = {n for n in tensors if n not in claimed}  # these stay where they are
        tree = _rebuild(ck.tree, keep, outputs)
        out = Checkpoint(tree, dict(ck.metadata), ck.format, ck.path, dict(ck.info))
        try:
            report.outputs = len(out.tensors())
        except CkptconvError as e:
            raise MappingError(f"{self.name}: {e}") from None
        report.rules = [{"rule": str(r), "where": r.where, "used": uses[id(r)]} for r in self.rules]
        self.report = report
        return out

    def _apply_chain(self, ck: Checkpoint, strict: bool) -> Checkpoint:
        reports = []
        for m in self.stages:
            ck = m.apply(ck, strict=False)
            reports.append(m.report)
        first = reports[0]
        unmatched = set(first.unmatched)
        for r in reports[1:]:
            unmatched &= set(r.unmatched)
        rep = MappingReport(self.name, keys=first.keys)
        rep.unmatched = [n for n in first.unmatched if n in unmatched]
        rep.matched = first.keys - len(rep.unmatched)
        rep.outputs = reports[-1].outputs
        for r in reports:
            rep.rules += r.rules
            rep.dropped += r.dropped
            rep.added += r.added
            rep.renamed.update(r.renamed)
        self.report = rep
        if strict and rep.unmatched:
            raise MappingError(f"{self.name}: {len(rep.unmatched)} keys match no rule "
                               f"(strict): {name_list(rep.unmatched, 5)}")
        return ck

    # -- inversion --
    def inverse(self) -> "Mapping":
        """Rules that undo this mapping (renames, transposes, permutes, split<->concat,
        stack<->unstack, lossless casts, scale, pad; reshape/cast once applied).
        Raises MappingError for what loses information (drop, slice, sum, regex)."""
        if self.stages:
            return Mapping.chain([m.inverse() for m in reversed(self.stages)])
        front, rules = [], []
        for r in self.rules:
            inv = invert_rule(r)
            (front if r.add else rules).append(inv)
        # First match wins in the inverse too, and a general rule's image can
        # cover a specific rule's ('module.{rest*} -> {rest}' inverts to
        # '{rest*} -> module.{rest}'): the more literal sources go first.
        rules.sort(key=lambda r: -sum(len(p) for s in r.sources for p in s.parts if isinstance(p, str)))
        name = self.name[:-6] if self.name.endswith(".rules") else self.name
        return Mapping(front + rules, f"inverse of {name}")


# --- rebuilding the tree --------------------------------------------------------------------

class _Placer:
    """Finds where a renamed tensor goes in the old tree, with
    each node's keys indexed once: flat state dicts have many thousands."""

    def __init__(self, tree, removed: set[str]):
        self.tree, self.removed = tree, removed
        self._index: dict[int, tuple[dict, list]] = {}

    def index(self, node) -> tuple[dict, list]:
        """(str(key) -> (key, child) for dicts, [(str(key), key, child)] of container children)."""
        got = self._index.get(id(node))
        if got is None:
            entries = list(children(node))
            exact = {str(k): (k, v) for k, v in entries} if isinstance(node, dict) else {}
            conts = sorted(((str(k), k, v) for k, v in entries if is_container(v)),
                           key=lambda t: -len(t[0]))
            got = self._index[id(node)] = (exact, conts)
        return got

    def resolve(self, name: str) -> tuple[tuple, Any]:
        """(path of a dict in the old tree, key) where a tensor named ``name`` goes:
        the deepest dict whose path is a prefix of the name."""
        node, path, rest = self.tree, (), name
        last = None
        while True:
            exact, conts = self.index(node)
            if isinstance(node, dict):
                last = (path, rest)
                hit = exact.get(rest)
                if hit is not None:
                    k, v = hit
                    if isinstance(v, TensorRef) and join_path(path + (k,)) in self.removed:
                        return path, k
                    raise MappingError(f"mapped name '{name}' collides with an existing "
                                       f"{'tensor' if isinstance(v, TensorRef) else 'entry'}")
            for ks, k, v in conts:  # longest key first
                if rest.startswith(ks + "."):
                    node, path, rest = v, path + (k,), rest[len(ks) + 1:]
                    break
            else:
                break
        if last is None:
            raise MappingError(f"cannot place mapped tensor '{name}': the checkpoint's root is "
                               f"a {type(self.tree).__name__}, not a dict")
        return last


def _rebuild(tree, keep: set[str], outputs: list[tuple[str, TensorRef, str]]):
    paths = {join_path(p): p for p, leaf in iter_leaves(tree) if isinstance(leaf, TensorRef)}
    removed = set(paths) - keep
    placed: dict[tuple, list] = {}   # dict path -> [(key, ref, anchor path)]
    placer = _Placer(tree, removed)
    for name, ref, anchor in outputs:
        if name in keep and anchor == name:
            continue  # passed through: stays where it is
        dpath, key = placer.resolve(name)
        placed.setdefault(dpath, []).append((key, ref, paths.get(anchor)))

    def put(out, key, value, path):
        if key in out:
            raise MappingError(f"mapped name '{join_path(path + (key,))}' is written twice")
        out[key] = value

    def build(node, path):
        if isinstance(node, TensorRef):
            return node if join_path(path) in keep else _REMOVED
        if isinstance(node, dict):
            out = OrderedDict() if isinstance(node, OrderedDict) else {}
            here = placed.get(path, [])
            at: dict[tuple, list] = {}
            tail = []
            for key, ref, anchor in here:
                if anchor is not None and anchor[:-1] == path:
                    at.setdefault(anchor, []).append((key, ref))
                else:
                    tail.append((key, ref))
            for k, v in node.items():
                for key, ref in at.get(path + (k,), ()):
                    put(out, key, ref, path)
                child = build(v, path + (k,))
                if child is not _REMOVED:
                    put(out, k, child, path)
            for key, ref in tail:
                put(out, key, ref, path)
            if node and not out:
                return _REMOVED
            return out
        if isinstance(node, (list, tuple)):
            items = [build(v, path + (i,)) for i, v in enumerate(node)]
            kept = [x for x in items if x is not _REMOVED]
            if node and not kept:
                return _REMOVED
            return kept if isinstance(node, list) else tuple(kept)
        if isinstance(node, ObjectRecord) and is_container(node):
            if isinstance(node.state, dict):
                state = build(node.state, path)
            elif node.state is not None:
                state = build(node.state, path + ("__state__",))
            else:
                state = None
            args = build(node.args, path + ("__args__",)) if node.args else node.args
            return ObjectRecord(node.cls, {} if state is _REMOVED else state,
                                () if args is _REMOVED else args, node.kind)
        return node

    new = build(tree, ())
    if new is _REMOVED:
        new = OrderedDict() if isinstance(tree, OrderedDict) else {}
        for key, ref, _ in placed.get((), []):
            put(new, key, ref, ())
    return new
