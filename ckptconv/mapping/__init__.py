"""The key-rename mapping DSL: parse rules, apply them lazily, invert them, report.

One rule a line, ``#`` starts a comment, the first rule that matches a key wins
(the grammar is in CONTRACT.md, "Mapping DSL")::

    module.{rest*}                        -> {rest}
    bert/encoder/layer_{i}/{rest*}/kernel -> bert.encoder.layer.{i}.{rest}.weight | transpose
    {p*}/adam_{m_or_v}                    -> drop
    q.weight, k.weight, v.weight          -> qkv.weight | concat(0)
    attn.qkv.weight -> attn.q.weight, attn.k.weight, attn.v.weight | split(0)
    re:^layers\\.(\\d+)\\.w$                -> blocks.\\1.weight
    {p*}/kernel{t?} -> {p}.weight | permute(3, 2, 0, 1)  if ndim == 4
    add {p*}/lstm_cell/bias -> {p}.bias_hh_l0 | zeros
    add step_count = zeros(shape=[], dtype=int64)

Patterns. ``/`` and ``.`` both separate segments (a pattern written with one
matches names written with the other). ``{x}`` captures one segment (or the
part of one: ``layer_{i}``), ``{x*}`` one or more segments, ``{x?}`` zero or
more characters inside a segment (``kernel{t?}`` matches ``kernel`` and Keras
2's ``kernel:0``). A capture named twice must match the same text twice.
Substituted multi-segment captures take the separator the target pattern
writes next to them (``{p}.weight`` writes dots). ``re:`` sources are Python
regular expressions (``re.search``); their targets use ``\\1`` / ``\\g<name>``.

Rules. Several comma-separated sources make a many-to-one rule: the first
source is matched against a key, the others are filled in with its captures
and must all be present; the keys are claimed together, but only if no earlier
rule claims one of them. The transforms then run on the list of tensors:
``transpose``, ``permute``, ``reshape``, ``cast``, ``slice``, ``pad``, ``scale``,
``reorder`` and ``zeros`` act on each; ``concat``, ``stack`` and ``sum`` turn
many into one; ``split`` and ``unstack`` turn one into as many as there are
targets. One tensor for several targets ties them (one tensor, several names).
``-> drop`` (or ``| drop``) removes keys. ``if ndim == 4`` (also ``!=``, ``<``,
``<=``, ``>``, ``>=``, ``dtype == float16``, joined with ``and``) restricts a rule
to tensors of that rank or dtype. ``add SRC -> TGT | ...`` emits extra tensors
for every key it matches without claiming the key; ``add NAME = zeros(...)``
adds a constant. Keys no rule matches pass through (``strict`` makes them an
error). A line ``---`` starts a stage that maps the previous stage's output
(several ``--map`` options chain the same way). Every application leaves a
``MappingReport`` in ``mapping.report``: rules used and how often, keys
matched, unmatched keys, unused rules, dropped and added names.

Inversion. ``Mapping.inverse()`` swaps sources and targets and inverts the
transforms (split <-> concat, stack <-> unstack, permute, transpose, reorder,
scale, pad -> slice; reshape and cast once the mapping has been applied and
the input shapes / a lossless source dtype are known). Rules that lose
information (drop, slice, sum, scale(0), a down-cast, re:, targets that do not
use every capture) raise ``MappingError``; what an ``add`` rule added is dropped.

Laziness. A rename or a drop moves the same ``TensorRef`` object (ties stay
ties); ``split``/``slice`` of a stored tensor are views (still streamed from the
file), ``concat`` along the outer dimension streams its inputs one after the
other, everything else is a ``LazyTensor`` that computes with numpy when a
writer asks.

The result tree. Rules see the flat tensor names of ``Checkpoint.tensors()``.
The new tree keeps the old one's structure: tensors that pass through stay
where they were, non-tensor leaves are untouched, a renamed tensor is placed
into the deepest dict of the old tree whose path is a prefix of its new name
(``model_state.fc.weight`` goes into ``tree["model_state"]`` as ``"fc.weight"``)
at the position of its first source when that lies in the same dict, and
containers emptied by the mapping disappear. For a flat state dict this is a
new flat dict in source order.
"""
from __future__ import annotations

from .apply import Mapping, MappingReport
from .parse import Guard, Pattern, Rule, Template, parse_rule, parse_stages
from .presets import PresetsReport, preset_names, preset_text, presets_report
from .transforms import TRANSFORMS, ConcatTensor, Transform, concat, narrow, permute, reshape

__all__ = ["Mapping", "MappingReport", "Rule", "Pattern", "Template", "Guard", "parse_rule",
           "parse_stages", "PresetsReport", "preset_names", "preset_text", "presets_report",
           "Transform", "TRANSFORMS", "ConcatTensor", "concat", "narrow", "permute", "reshape",
           "resolve_mapping"]


def resolve_mapping(mapping) -> Mapping | None:
    """A Mapping from a Mapping, a preset name, a rules file, rules text or a list of those."""
    if mapping is None:
        return None
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, (list, tuple)):
        parts = [resolve_mapping(m) for m in mapping]
        return Mapping.chain(parts) if len(parts) > 1 else parts[0]
    return Mapping.load(str(mapping))
