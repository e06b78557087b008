"""Reading pickles without running them: the one restricted engine
(``engine``), opcode decoding and the raw name listing (``opcodes``), and
which names can run code (``names``).

Adapters subclass ``RestrictedUnpickler`` with their allowlist (torch's is in
``ckptconv.adapters.torch``); ``scan`` judges every pickle a file carries
with it. Nothing here imports or calls a name a pickle mentions.
"""
from __future__ import annotations

from .engine import (MAX_DEPTH, MAX_EXPANSION, MAX_KEY_NODES, MAX_MEMO, Pending,
                     RestrictedUnpickler)
from .names import (DANGEROUS_MODULES, Global, checked_allow_globals, is_dangerous, python3_name,
                    short_repr)
from .opcodes import decode_opcode, iter_opcodes, scan_globals, starts_a_pickle

__all__ = ["DANGEROUS_MODULES", "Global", "MAX_DEPTH", "checked_allow_globals", "MAX_EXPANSION",
           "MAX_KEY_NODES", "MAX_MEMO", "Pending", "RestrictedUnpickler", "decode_opcode",
           "is_dangerous", "iter_opcodes", "python3_name", "scan_globals", "short_repr", "starts_a_pickle"]
