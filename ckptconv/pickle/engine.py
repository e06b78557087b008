"""The restricted pickle engine: an opcode interpreter that never imports or
calls anything named by the file.

It runs the opcodes itself and builds plain Python values, the way torch's
``_weights_only_unpickler`` does. ``GLOBAL`` and ``STACK_GLOBAL`` only push
a ``Global(module, name)`` marker; what a ``REDUCE``/``INST``/``OBJ`` of it
means is decided by ``call`` (allowlisted constructors of the caller's
choosing, everything else refused with ``UnsafePickleError`` naming the
callable). ``NEWOBJ`` + ``BUILD`` of a class become an inert
``ObjectRecord`` unless the class lives in a module that can run code
(``os``, ``subprocess``, ``builtins`` ...), which is refused too.

One dispatch: ``_run`` decodes and runs the opcodes torch pickles are made
of inline (one byte compare each, no call), every other opcode through
``_rare_opcode``; each opcode has exactly one implementation. A stream is
read one pickle at a time into memory and run the same way.

No parser differentials: where CPython's pure-Python ``pickle._Unpickler``
(the reference) and the C unpickler could read the bytes differently, the
pickle is refused. Framing (protocol 4+) is checked as ``_Unframer`` does:
an opcode may not run past the end of its frame (the C unpickler reading a
file drops the frame's tail and reads the opcode's argument from the bytes
after the frame), a frame may not begin inside another, and a frame may not
declare more bytes than follow; each is ``UnsafePickleError`` naming the
offset. Data after STOP (a second pickle, any bytes) is read and judged:
refused as unsafe if it names or calls what we refuse, else a
``FormatError``. ``PROTO`` above 5 is refused as CPython refuses it.

Hardening against hostile pickles (each refusal is one line naming the name):
a dangerous name is refused when it is first *named* (``GLOBAL``,
``STACK_GLOBAL``, ``INST``), since ``pickle`` imports it right there; dotted
names are checked segment by segment (``argparse._os.system``); ``EXT*``
(copyreg registry) and non-storage persistent ids are refused; ``BUILD``
may not set dunder attributes (the ``__setstate__`` override trick) nor
shadow ``OrderedDict`` methods; keys are bounded before hashing; the result
is bounded in depth, must be acyclic, and may not expand through shared
memo entries ("billion laughs") beyond ``MAX_EXPANSION`` nodes.

Ground truth: CPython ``Lib/pickle.py`` (``_Unframer``, ``_Unpickler``) and
``Lib/pickletools.py`` (opcode semantics), ``torch/_weights_only_unpickler.py``
(the safe pattern).
"""
from __future__ import annotations

import gc
import io
import pickletools
from collections import OrderedDict
from typing import Any

from ..errors import CkptconvError, FormatError, UnsafePickleError
from ..tree import ObjectRecord
from .names import Global, is_dangerous, short_repr
from .opcodes import _NAMES, _PUSH_ARG, NameAtEnd, NulInLine, decode_opcode, opcode_extent, scan_globals

# Nesting deeper than this is refused: the tree walkers after us recurse
# (two or three Python frames a level), and real checkpoints nest < 30 deep.
MAX_DEPTH = 150
MAX_MEMO = 10_000_000
# A dict key or set member bigger than this (nodes) is refused: hashing and
# comparing shared ("billion laughs") tuples costs their expanded size.
MAX_KEY_NODES = 10_000
# The tree a pickle describes may share sub-structures through the memo; the
# size it expands to (what tree walks visit) must stay within this many nodes
# plus a few times the number of distinct nodes.
MAX_EXPANSION = 2_000_000
# Pickles after the first STOP that are judged before the file is refused.
MAX_TRAILING_PICKLES = 1000
HIGHEST_PROTOCOL = 5
_MAX_FAULTY_STREAM_READ = 64 << 20


class Pending:
    """A value finished by a later BUILD (numpy arrays, dtypes): ``value()`` at the end."""

    def build(self, state) -> None:
        raise NotImplementedError

    def value(self):
        raise NotImplementedError


_PLAIN_KEYS = frozenset((str, bytes, int, float, bool, complex, type(None)))
# Opcodes ``_run`` runs inline; ``_rare_opcode`` runs every other one.
INLINE_OPCODES = frozenset((
    "BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET", "BININT1", "MARK", "BINUNICODE",
    "SHORT_BINUNICODE", "BININT2", "TUPLE1", "TUPLE", "REDUCE", "EMPTY_TUPLE", "BINPERSID",
    "NEWFALSE", "NEWTRUE", "TUPLE2", "TUPLE3", "BININT", "STOP", "FRAME"))
_RARE_PUSH_ARG = _PUSH_ARG - INLINE_OPCODES
_MISSING = object()
# decoding errors a hostile pickle can cause; all end as one-line FormatErrors
_DECODE_ERRORS = (ValueError, EOFError, IndexError, TypeError, OverflowError, UnicodeDecodeError,
                  MemoryError, KeyError, AttributeError, RecursionError)

_ATOMS = frozenset((str, bytes, int, float, bool, complex, type(None)))


class RestrictedUnpickler:
    """Interpret one pickle. Subclasses decide what calls and persistent ids mean."""

    # Result types that hold nothing to resolve: ``finish`` passes them as they are.
    leaf_types: tuple[type, ...] = ()

    def __init__(self, display: str = "pickle"):
        self.display = display
        self.globals_seen: list[str] = []
        self.records: list[str] = []

    # --- hooks ----------------------------------------------------------------

    def allowed_global(self, qualname: str) -> bool:
        """Names in dangerous modules that this reader still accepts (its allowlist)."""
        return False

    def call(self, func: Global, args: tuple, opcode: str):
        """REDUCE/INST/OBJ of ``func`` with ``args``: allowlisted or refused."""
        raise UnsafePickleError(f"{self.display}: pickle calls {func.qualname} via {opcode} "
                                "(not allowlisted; nothing was executed)")

    def new_object(self, cls: Global, args: tuple, kwargs: dict | None = None):
        """NEWOBJ/NEWOBJ_EX: an inert record of ``cls``, unless its module can run code."""
        if is_dangerous(cls.qualname):
            raise UnsafePickleError(f"{self.display}: pickle builds {cls.qualname} via NEWOBJ "
                                    "(a class that can run code; nothing was executed)")
        self.records.append(cls.qualname)
        if kwargs:
            return ObjectRecord(cls.qualname, None, tuple(args) + (("__kwargs__", kwargs),))
        return ObjectRecord(cls.qualname, None, tuple(args))

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.display}: pickle has a persistent id {short_repr(pid)} "
                                "that is not a storage (refused, nothing was executed)")

    def build(self, obj, state):
        self._check_state_names(obj, state)
        if isinstance(obj, Pending):
            obj.build(state)
        elif isinstance(obj, ObjectRecord):
            obj.state = state if obj.state is None else _merge_state(obj.state, state)
        elif isinstance(obj, OrderedDict) and isinstance(state, dict):
            # OrderedDict.__reduce__ puts instance attributes (a state dict's
            # `_metadata`) in BUILD; keep them as attributes, but never let
            # one shadow a method our own code calls (``items``, ``keys``...).
            for k, v in state.items():
                if not isinstance(k, str) or not k.isidentifier() or hasattr(OrderedDict, k):
                    raise FormatError(f"{self.display}: pickle BUILD sets attribute "
                                      f"{short_repr(k)} on an OrderedDict (not a plain attribute)")
                setattr(obj, k, v)
        else:
            self.build_other(obj, state)
        return obj

    def _check_state_names(self, obj, state) -> None:
        """Refuse BUILD states that set dunder attributes.

        ``pickle`` applies a state dict with ``inst.__dict__.update`` and a
        slot-state dict with ``setattr``, and calls ``inst.__setstate__`` if
        it finds one: a first BUILD of ``{'__setstate__': os.system}`` makes
        the second BUILD call ``os.system(state)``, and ``__class__`` in a
        slot state swaps the class. No real object state needs such names.
        """
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if not isinstance(part, dict):
                continue
            for k in part:
                if isinstance(k, str) and k.startswith("__") and k.endswith("__"):
                    what = obj.cls if isinstance(obj, ObjectRecord) else type(obj).__name__
                    raise UnsafePickleError(
                        f"{self.display}: pickle BUILD sets {k} on {what} (overrides how the "
                        "object behaves; refused, nothing was executed)")

    def build_other(self, obj, state):
        raise UnsafePickleError(f"{self.display}: pickle BUILDs state into a "
                                f"{type(obj).__name__} (only records and known types allowed)")

    def bare_global(self, g: Global):
        """A Global left in the result as a value (e.g. a dtype argument): an
        inert record, also for an allowlisted name (named, never called)."""
        if is_dangerous(g.qualname) and not self.allowed_global(g.qualname):
            raise UnsafePickleError(f"{self.display}: pickle references {g.qualname} "
                                    "(a callable that can run code; nothing was executed)")
        return ObjectRecord(g.qualname, kind="global")

    # --- the interpreter --------------------------------------------------------

    def load(self, data: bytes | bytearray | memoryview | io.BufferedIOBase, *,
             whole: bool = True) -> Any:
        """Interpret one pickle.

        Bytes in memory must be that one pickle: with ``whole`` (the default)
        data after its STOP is judged and refused (``UnsafePickleError`` if it
        names or calls what we refuse, else ``FormatError``). A stream gives
        one pickle from its position and is left just after its STOP (torch's
        legacy files are pickles in a row).
        """
        # A pickle builds many small containers and no reference cycles (they
        # are refused): the cyclic GC would only rescan them again and again.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                buf = bytes(data)
            else:
                buf = _read_one_pickle(data, self.display)
                whole = False  # the rest of its last frame: CPython skips it too
            try:
                root, end = self._run(buf, 0)
                if end < len(buf) and whole:
                    self._judge_after_stop(buf, end)
                return self.finish(root)
            except _DECODE_ERRORS as e:
                error = self._decode_error(e)
            except FormatError as e:
                error = e
            # malformed for us: what CPython would still reach decides
            self._refuse_named(buf, error)
            raise error
        finally:
            if gc_was_on:
                gc.enable()

    def _decode_error(self, e: Exception) -> CkptconvError:
        if isinstance(e, NulInLine):
            return UnsafePickleError(f"{self.display}: {e}; refused, nothing was executed")
        if isinstance(e, NameAtEnd) and is_dangerous(e.qualname) and \
                not self.allowed_global(e.qualname):
            return UnsafePickleError(f"{self.display}: pickle names {e.qualname} via {e.opcode} "
                                     "on its last line (CPython reading a file looks it up "
                                     "before failing; refused, nothing was executed)")
        error = FormatError(f"{self.display}: corrupt or truncated pickle ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]})")
        error.__cause__ = e
        return error

    def _refuse_named(self, buf: bytes, error: CkptconvError) -> None:
        """A pickle we call malformed is still unsafe if it, or a pickle after
        it, names a global we refuse: CPython's unpickler (and a reader loading
        pickle after pickle) gets there before it fails, where we are stricter."""
        if isinstance(error, UnsafePickleError):
            return
        for opcode, name in scan_globals(buf, every_pickle=True):
            if opcode in ("EXT1", "EXT2", "EXT4") or (
                    opcode in ("GLOBAL", "INST", "STACK_GLOBAL") and is_dangerous(name)
                    and not self.allowed_global(name)):
                msg = " ".join(str(error).split())
                msg = msg[len(self.display) + 2:] if msg.startswith(f"{self.display}: ") else msg
                raise UnsafePickleError(f"{self.display}: pickle names {name} via {opcode} "
                                        f"(refused, nothing was executed; it is also malformed: "
                                        f"{msg[:160]})") from None

    def _run(self, data: bytes, pos: int) -> tuple[Any, int]:
        """Run the pickle that starts at ``data[pos]`` up to its STOP; returns
        (the value, the offset just after STOP).

        The opcodes torch pickles are made of are decoded and run inline (one
        byte dispatch, no generator, no per-opcode call); every other opcode
        through ``_rare_opcode``. While a frame is current, ``buf`` is a copy
        of the frame (CPython's ``_Unframer`` reads from one too), so an
        opcode that runs past the frame's end fails to decode there, and
        ``_check_frame_crossing`` says so.
        """
        d = self.display
        buf, base, n = data, 0, len(data)   # base: offset of buf in data (a frame's start)
        in_frame = False
        short_frame = -1    # offset of a FRAME that declares more bytes than follow
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        rare, call, persistent_load = self._rare_opcode, self._call, self.persistent_load
        from_bytes = int.from_bytes
        try:
            while True:
                while pos < n:
                    code = buf[pos]
                    if code == 0x71:  # BINPUT
                        if not stack:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        memo[buf[pos + 1]] = stack[-1]
                        pos += 2
                    elif code == 0x68:  # BINGET
                        v = memo.get(buf[pos + 1], _MISSING)
                        if v is _MISSING:
                            raise FormatError(f"{d}: corrupt pickle (memo {buf[pos + 1]} read "
                                              "before written)")
                        stack.append(v)
                        pos += 2
                    elif code == 0x72:  # LONG_BINPUT
                        if pos + 5 > n:
                            raise ValueError(f"truncated LONG_BINPUT at offset {base + pos}")
                        if not stack:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        i = from_bytes(buf[pos + 1:pos + 5], "little")
                        if i > MAX_MEMO:  # bounds the memo: other puts use indexes < 256
                            raise FormatError(f"{d}: corrupt pickle (memo index {i} beyond "
                                              f"{MAX_MEMO})")
                        memo[i] = stack[-1]
                        pos += 5
                    elif code == 0x6A:  # LONG_BINGET
                        if pos + 5 > n:
                            raise ValueError(f"truncated LONG_BINGET at offset {base + pos}")
                        i = from_bytes(buf[pos + 1:pos + 5], "little")
                        v = memo.get(i, _MISSING)
                        if v is _MISSING:
                            raise FormatError(f"{d}: corrupt pickle (memo {i} read before written)")
                        stack.append(v)
                        pos += 5
                    elif code == 0x4B:  # BININT1
                        stack.append(buf[pos + 1])
                        pos += 2
                    elif code == 0x28:  # MARK
                        metastack.append(stack)
                        stack = []
                        pos += 1
                    elif code == 0x58 or code == 0x8C:  # BINUNICODE, SHORT_BINUNICODE
                        if code == 0x58:
                            if pos + 5 > n:
                                raise ValueError(f"truncated BINUNICODE at offset {base + pos}")
                            start = pos + 5
                            end = start + from_bytes(buf[pos + 1:start], "little")
                        else:
                            start = pos + 2
                            end = start + buf[pos + 1]
                        if end > n:
                            raise ValueError(f"string at offset {base + pos} needs {end - n} bytes "
                                             "past the end")
                        stack.append(buf[start:end].decode("utf-8", "surrogatepass"))
                        pos = end
                    elif code == 0x4D:  # BININT2
                        if pos + 3 > n:
                            raise ValueError(f"truncated BININT2 at offset {base + pos}")
                        stack.append(buf[pos + 1] | (buf[pos + 2] << 8))
                        pos += 3
                    elif code == 0x85:  # TUPLE1
                        if not stack:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        stack[-1] = (stack[-1],)
                        pos += 1
                    elif code == 0x74:  # TUPLE
                        if not metastack:
                            raise FormatError(f"{d}: corrupt pickle (MARK missing)")
                        items = tuple(stack)
                        stack = metastack.pop()
                        stack.append(items)
                        pos += 1
                    elif code == 0x52:  # REDUCE
                        if len(stack) < 2:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        args = stack.pop()
                        stack[-1] = call(stack[-1], args, "REDUCE")
                        pos += 1
                    elif code == 0x29:  # EMPTY_TUPLE
                        stack.append(())
                        pos += 1
                    elif code == 0x51:  # BINPERSID
                        if not stack:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        stack[-1] = persistent_load(stack[-1])
                        pos += 1
                    elif code == 0x89 or code == 0x88:  # NEWFALSE, NEWTRUE
                        stack.append(code == 0x88)
                        pos += 1
                    elif code == 0x86 or code == 0x87:  # TUPLE2, TUPLE3
                        k = code - 0x84
                        if len(stack) < k:
                            raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                        items = tuple(stack[-k:])
                        del stack[-k:]
                        stack.append(items)
                        pos += 1
                    elif code == 0x4A:  # BININT
                        if pos + 5 > n:
                            raise ValueError(f"truncated BININT at offset {base + pos}")
                        stack.append(from_bytes(buf[pos + 1:pos + 5], "little", signed=True))
                        pos += 5
                    elif code == 0x2E:  # STOP
                        if len(stack) != 1 or metastack:
                            raise FormatError(f"{d}: corrupt pickle (stack holds {len(stack)} "
                                              f"{'after an unclosed MARK ' if metastack else ''}at "
                                              f"STOP, offset {base + pos})")
                        if short_frame >= 0:
                            self._short_frame(data, short_frame)
                        return stack[0], base + pos + 1
                    elif code == 0x95:  # FRAME
                        buf, base, short_frame = self._frame(data, base + pos,
                                                             base + n if in_frame else -1)
                        pos, n, in_frame = 0, len(buf), True
                    else:
                        name, arg, end = decode_opcode(buf, pos, n)
                        stack = rare(name, arg, stack, metastack, memo)
                        pos = end
                if not in_frame:
                    break
                # the frame is read to its end: go on in the data after it
                pos, buf, base, n, in_frame = base + n, data, 0, len(data), False
        except _DECODE_ERRORS:
            if in_frame:
                self._check_frame_crossing(data, base + pos, base + n)
            raise
        raise FormatError(f"{d}: truncated pickle (no STOP opcode)")

    def _frame(self, data: bytes, at: int, frame_end: int) -> tuple[bytes, int, int]:
        """FRAME at ``data[at]`` (``frame_end``: the current frame's end, -1 if
        none): (a copy of the new frame, its offset, ``at`` if the frame
        declares more bytes than follow else -1). Refused as CPython's
        ``_Unframer`` refuses, or where the C unpickler would read otherwise.

        A frame longer than the data is a truncated pickle (every reader
        fails) unless a STOP is reached in it: then CPython's pure-Python
        reader returns a value where the C reader fails (``_short_frame``)."""
        d = self.display
        limit = frame_end if frame_end >= 0 else len(data)
        if at + 9 > limit:
            if frame_end >= 0 and at + 9 <= len(data):
                self._check_frame_crossing(data, at, frame_end)
            raise ValueError(f"truncated FRAME at offset {at}")
        length = int.from_bytes(data[at + 1:at + 9], "little")
        start = at + 9
        if frame_end > start:
            raise UnsafePickleError(
                f"{d}: FRAME at offset {at} begins inside the frame that ends at offset "
                f"{frame_end} (a frame inside a frame; CPython refuses it; nothing was executed)")
        if length > len(data) - start:
            return data[start:], start, at
        return data[start:start + length], start, -1

    def _short_frame(self, data: bytes, at: int) -> None:
        length = int.from_bytes(data[at + 1:at + 9], "little")
        raise UnsafePickleError(
            f"{self.display}: FRAME at offset {at} declares {length} bytes, only "
            f"{len(data) - at - 9} follow, yet its STOP is inside (CPython's readers disagree "
            "on such a pickle; nothing was executed)")

    def _check_frame_crossing(self, data: bytes, at: int, frame_end: int) -> None:
        """The opcode at ``data[at]`` failed to decode inside its frame: if its
        layout (length field, newlines) reaches past the frame's end, it runs
        past the frame, whatever its content (the C reader would take the
        rest from after the frame: an undecodable tail hides nothing)."""
        end = opcode_extent(data, at)
        name = _NAMES[data[at]] or f"opcode {data[at]:#04x}"
        if end > frame_end:
            raise UnsafePickleError(
                f"{self.display}: {name} at offset {at} runs past the end of its frame at offset "
                f"{frame_end} (CPython refuses it; the C unpickler reading a file would read it "
                "from the bytes after the frame; nothing was executed)")

    def _judge_after_stop(self, data: bytes, end: int) -> None:
        """Bytes after the STOP of a pickle that should be alone: refused,
        as unsafe if they name or call anything we refuse (a reader that loads
        pickles in a row would run them), else as malformed."""
        d = self.display
        where = f"{len(data) - end} bytes after the pickle's STOP (offset {end - 1})"
        pos, count = end, 0
        while pos < len(data) and count < MAX_TRAILING_PICKLES:
            try:
                _, pos = self._run(data, pos)
            except UnsafePickleError as e:
                msg = str(e)
                msg = msg[len(d) + 2:] if msg.startswith(f"{d}: ") else msg
                raise UnsafePickleError(f"{d}: {where}: {msg}") from None
            except (FormatError, *_DECODE_ERRORS) as e:
                for opcode, name in scan_globals(data[pos:]):
                    if opcode in ("EXT1", "EXT2", "EXT4") or (
                            opcode in ("GLOBAL", "INST", "STACK_GLOBAL") and is_dangerous(name)
                            and not self.allowed_global(name)):
                        raise UnsafePickleError(
                            f"{d}: {where} name {name} via {opcode} (refused, nothing was "
                            "executed)") from None
                reason = e if isinstance(e, FormatError) else f"{type(e).__name__}: {e}"
                raise FormatError(f"{d}: {where}, not a pickle we read "
                                  f"({' '.join(str(reason).split())[:120]})") from None
            count += 1
        raise FormatError(f"{d}: {where}: {count} more pickle{'s' if count != 1 else ''} "
                          "(a file holds one pickle; refused)")

    def _rare_opcode(self, name: str, arg, stack: list, metastack: list, memo: dict) -> list:
        """Run one opcode that ``_run`` does not run inline; returns the stack,
        which the opcodes that pop a mark replace."""
        d = self.display

        def pop_mark() -> list:
            nonlocal stack
            if not metastack:
                raise FormatError(f"{d}: corrupt pickle (MARK missing)")
            items = stack
            stack = metastack.pop()
            return items

        def top():
            if not stack:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            return stack[-1]

        if name == "PUT":
            if int(arg) < 0:
                raise FormatError(f"{d}: corrupt pickle (bad memo index {arg})")
            if int(arg) > MAX_MEMO:
                raise FormatError(f"{d}: corrupt pickle (memo index {arg} beyond {MAX_MEMO})")
            memo[int(arg)] = top()
        elif name == "GET":
            v = memo.get(int(arg), _MISSING)
            if v is _MISSING:
                raise FormatError(f"{d}: corrupt pickle (memo {arg} read before written)")
            stack.append(v)
        elif name in _RARE_PUSH_ARG:
            stack.append(arg)
        elif name == "PROTO":
            if not 0 <= arg <= HIGHEST_PROTOCOL:
                raise FormatError(f"{d}: unsupported pickle protocol {arg}")
        elif name == "PERSID":
            stack.append(self.persistent_load(arg))
        elif name == "GLOBAL":
            module, gname = arg
            stack.append(self._global(module, gname))
        elif name == "SETITEMS":
            items = pop_mark()
            self._pairs(top(), items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "NONE":
            stack.append(None)
        elif name == "BUILD":
            if len(stack) < 2:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            state = stack.pop()
            self.build(top(), state)
        elif name == "NEWOBJ":
            if len(stack) < 2:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            args = stack.pop()
            cls = stack.pop()
            stack.append(self._newobj(cls, args, None))
        elif name == "APPENDS":
            items = pop_mark()
            lst = top()
            if not isinstance(lst, list):
                raise FormatError(f"{d}: corrupt pickle (APPENDS to {type(lst).__name__})")
            lst.extend(items)
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "BYTEARRAY8":
            stack.append(bytearray(arg))
        elif name == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(top())
        elif name == "EMPTY_SET":
            stack.append(set())
        elif name == "LIST":
            items = pop_mark()  # rebinds `stack`: pop before appending
            stack.append(items)
        elif name == "DICT":
            items = pop_mark()
            stack.append(self._pairs({}, items))
        elif name == "FROZENSET":
            items = pop_mark()
            stack.append(frozenset(self._hashable(x) for x in items))
        elif name == "APPEND":
            if len(stack) < 2:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            v = stack.pop()
            lst = top()
            if not isinstance(lst, list):
                raise FormatError(f"{d}: corrupt pickle (APPEND to {type(lst).__name__})")
            lst.append(v)
        elif name == "SETITEM":
            if len(stack) < 3:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            v = stack.pop()
            k = stack.pop()
            self._pairs(top(), [k, v])
        elif name == "ADDITEMS":
            items = pop_mark()
            s = top()
            if not isinstance(s, set):
                raise FormatError(f"{d}: corrupt pickle (ADDITEMS to {type(s).__name__})")
            s.update(self._hashable(x) for x in items)
        elif name == "MEMOIZE":
            if len(memo) >= MAX_MEMO:
                raise FormatError(f"{d}: corrupt pickle (more than {MAX_MEMO} memo entries)")
            memo[len(memo)] = top()
        elif name == "STACK_GLOBAL":
            if len(stack) < 2:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            gname, module = stack.pop(), stack.pop()
            if not isinstance(module, str) or not isinstance(gname, str):
                raise FormatError(f"{d}: corrupt pickle (STACK_GLOBAL needs two strings)")
            stack.append(self._global(module, gname, name))
        elif name == "INST":
            module, gname = arg
            args = tuple(pop_mark())
            stack.append(self._call(self._global(module, gname, "INST"), args, "INST"))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise FormatError(f"{d}: corrupt pickle (OBJ without a class)")
            stack.append(self._call(items[0], tuple(items[1:]), "OBJ"))
        elif name == "NEWOBJ_EX":
            if len(stack) < 3:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            kwargs = stack.pop()
            args = stack.pop()
            cls = stack.pop()
            stack.append(self._newobj(cls, args, kwargs))
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise UnsafePickleError(f"{d}: pickle uses the copyreg extension registry "
                                    f"({name} code {arg}); refused, nothing was executed")
        elif name in INLINE_OPCODES:
            raise AssertionError(f"{name} is run inline")
        elif name in ("NEXT_BUFFER", "READONLY_BUFFER"):
            raise FormatError(f"{d}: pickle uses out-of-band buffers ({name}), "
                              "which a checkpoint file cannot carry")
        else:
            raise FormatError(f"{d}: unsupported pickle opcode {name}")
        return stack

    def _global(self, module: str, name: str, opcode: str = "GLOBAL") -> Global:
        g = Global(module, name)
        q = g.qualname
        self.globals_seen.append(q)
        # ``pickle`` imports the module as soon as it meets the name, whether
        # or not it is called later: refuse dangerous names right here.
        if is_dangerous(q) and not self.allowed_global(q):
            raise UnsafePickleError(f"{self.display}: pickle names {q} via {opcode} (a callable "
                                    "that can run code; refused, nothing was executed)")
        return g

    def _call(self, func, args, opcode):
        if not isinstance(func, Global):
            what = func.cls if isinstance(func, ObjectRecord) else type(func).__name__
            raise UnsafePickleError(f"{self.display}: pickle calls the result of {what} "
                                    f"via {opcode} (only named, allowlisted callables are "
                                    "considered; nothing was executed)")
        if not isinstance(args, tuple):
            raise FormatError(f"{self.display}: corrupt pickle ({opcode} arguments are not a tuple)")
        return self.call(func, args, opcode)

    def _newobj(self, cls, args, kwargs):
        if not isinstance(cls, Global):
            what = cls.cls if isinstance(cls, ObjectRecord) else type(cls).__name__
            raise UnsafePickleError(f"{self.display}: pickle NEWOBJ of the result of {what} "
                                    "(only named classes are recorded; nothing was executed)")
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise FormatError(f"{self.display}: corrupt pickle (bad NEWOBJ arguments)")
        return self.new_object(cls, args, kwargs)

    def _hashable(self, k):
        if type(k) in _PLAIN_KEYS:
            return k
        if isinstance(k, (tuple, frozenset, ObjectRecord)):
            self._check_key_size(k)
        try:
            hash(k)
        except TypeError:
            raise FormatError(f"{self.display}: corrupt pickle (unhashable {type(k).__name__} "
                              "used as a key)") from None
        return k

    def _check_key_size(self, k) -> None:
        """Hashing or comparing a key visits all of it: bound its size and depth
        first (shared tuples expand exponentially; deep ones overflow C recursion)."""
        todo = [(k, 0)]
        seen = 0
        while todo:
            node, depth = todo.pop()
            seen += 1
            if seen > MAX_KEY_NODES or depth > MAX_DEPTH:
                raise FormatError(f"{self.display}: pickle uses a huge or deeply nested "
                                  f"{type(k).__name__} as a dict key or set member")
            if isinstance(node, (tuple, frozenset)):
                todo.extend((x, depth + 1) for x in node)
            elif isinstance(node, ObjectRecord):
                todo.append((node.args, depth + 1))
                todo.append((node.state, depth + 1))

    def _pairs(self, target, items):
        if not isinstance(target, dict):
            raise FormatError(f"{self.display}: corrupt pickle (SETITEM on {type(target).__name__})")
        if len(items) % 2:
            raise FormatError(f"{self.display}: corrupt pickle (odd number of dict items)")
        for i in range(0, len(items), 2):
            target[self._hashable(items[i])] = items[i + 1]
        return target

    # --- finishing: resolve pending values, refuse cycles and absurd depth ------

    def finish(self, root):
        memo: dict[int, Any] = {}
        active: set[int] = set()
        # expanded[id]: how many nodes the sub-tree has once shared parts are
        # counted at every place they appear (what later tree walks visit)
        expanded: dict[int, int] = {}
        total = [0]

        leaves = _ATOMS | frozenset(self.leaf_types)

        def fix(obj, depth):
            if depth > MAX_DEPTH:
                raise FormatError(f"{self.display}: pickle nests deeper than {MAX_DEPTH} levels")
            if type(obj) in leaves or isinstance(obj, (str, bytes, int, float, complex)):
                total[0] += 1
                return obj
            key = id(obj)
            if key in memo:
                total[0] += expanded[key]
                if total[0] > MAX_EXPANSION + 4 * len(memo):
                    raise FormatError(
                        f"{self.display}: pickle shares sub-structures so that its tree expands "
                        f"to more than {total[0]} nodes from {len(memo)} distinct ones "
                        "(a 'billion laughs' structure)")
                return memo[key]
            if key in active:
                raise FormatError(f"{self.display}: pickle holds a self-referencing structure")
            active.add(key)
            before = total[0]
            total[0] += 1
            try:
                if isinstance(obj, Pending):
                    out = fix(obj.value(), depth + 1)
                elif isinstance(obj, Global):
                    out = self.bare_global(obj)
                elif isinstance(obj, OrderedDict):
                    out = OrderedDict((fix(k, depth + 1), fix(v, depth + 1)) for k, v in obj.items())
                    for attr, v in vars(obj).items():
                        setattr(out, attr, fix(v, depth + 1))
                elif isinstance(obj, dict):
                    out = {fix(k, depth + 1): fix(v, depth + 1) for k, v in obj.items()}
                elif isinstance(obj, list):
                    out = [fix(v, depth + 1) for v in obj]
                elif isinstance(obj, tuple):
                    out = tuple(fix(v, depth + 1) for v in obj)
                elif isinstance(obj, (set, frozenset)):
                    out = type(obj)(fix(v, depth + 1) for v in obj)
                elif isinstance(obj, ObjectRecord):
                    out = ObjectRecord(obj.cls, fix(obj.state, depth + 1),
                                       fix(obj.args, depth + 1), obj.kind)
                else:
                    out = self.finish_other(obj)
            finally:
                active.discard(key)
            memo[key] = out
            expanded[key] = total[0] - before
            return out

        return fix(root, 0)

    def finish_other(self, obj):
        return obj


def _merge_state(old, new):
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        merged.update(new)
        return merged
    return new




def _read_one_pickle(stream, display: str) -> bytes:
    """The bytes of the pickle at a stream's position, which is left where
    CPython's unpickler leaves it: after its STOP, or after the end of the frame
    that holds the STOP (CPython reads whole frames). If its opcodes do not
    parse to a STOP, up to 64 MiB from there: the engine then finds the
    fault (or a refusal before it) as it does in bytes."""
    start = stream.tell()
    frame_end = 0
    try:
        for op, arg, pos in pickletools.genops(stream):
            if op.name == "FRAME":
                frame_end = pos + 9 + arg
            elif op.name == "STOP":
                end = max(stream.tell(), frame_end)
                stream.seek(start)
                return stream.read(end - start)
    except _DECODE_ERRORS:
        pass
    stream.seek(start)
    return stream.read(_MAX_FAULTY_STREAM_READ)
