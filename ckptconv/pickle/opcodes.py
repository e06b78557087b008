"""Pickle opcodes as bytes: decode one opcode and its argument, walk a
pickle's opcodes, and list the names a pickle mentions.

The same opcode stream ``pickletools.genops`` gives, several times faster for
the opcodes torch pickles are made of, bounds-checked against the end the
caller gives (the end of the data, or of the current frame). ``GLOBAL`` and
``INST`` names are decoded as CPython's ``pickle._Unpickler`` decodes them
(UTF-8 and ASCII lines, no escapes), not as ``pickletools`` shows them.

Ground truth: CPython ``Lib/pickle.py`` (``_Unpickler.load_*``) and
``Lib/pickletools.py`` (opcode table, argument formats).
"""
from __future__ import annotations

import io
import pickletools
import struct
from typing import Any

# Opcodes whose argument is simply pushed.
_PUSH_ARG = frozenset((
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"))

# How the fast tokenizer reads each opcode's argument; anything not listed
# here goes through pickletools' own reader for that opcode.
_NAMES: list[str | None] = [None] * 256
_KIND: list[str] = [""] * 256
for _op in pickletools.opcodes:
    _NAMES[ord(_op.code)] = _op.name
    _KIND[ord(_op.code)] = "none" if _op.arg is None else "reader"
for _name, _kind in (("BININT1", "u1"), ("BINGET", "u1"), ("BINPUT", "u1"), ("PROTO", "u1"),
                     ("EXT1", "u1"), ("BININT2", "u2"), ("EXT2", "u2"), ("BININT", "s4"),
                     ("EXT4", "s4"), ("LONG_BINGET", "u4"), ("LONG_BINPUT", "u4"),
                     ("BINFLOAT", "f8"), ("SHORT_BINUNICODE", "str1"), ("BINUNICODE", "str4"),
                     ("SHORT_BINBYTES", "bytes1"), ("BINBYTES", "bytes4"), ("LONG1", "long1"),
                     ("GLOBAL", "names utf-8"), ("INST", "names ascii")):
    _KIND[ord(pickletools.opcodes[[o.name for o in pickletools.opcodes].index(_name)].code)] = _kind
_CODE2OP = {ord(o.code): o for o in pickletools.opcodes}


_unpack_double = struct.Struct(">d").unpack_from


def decode_opcode(buf: bytes, pos: int, n: int) -> tuple[str, Any, int]:
    """(opcode name, argument, position after it) of the opcode at ``pos``;
    arguments are bounds-checked (``ValueError`` names the offset)."""
    code = buf[pos]
    start = pos
    pos += 1
    name = _NAMES[code]
    if name is None:
        raise ValueError(f"unknown opcode {code:#04x} at offset {start}")
    kind = _KIND[code]
    if kind == "none":
        return name, None, pos
    if kind == "u1" or kind == "str1" or kind == "bytes1" or kind == "long1":
        if pos >= n:
            raise ValueError(f"truncated {name} at offset {start}")
        arg = buf[pos]
        pos += 1
        if kind != "u1":
            end = pos + arg
            if end > n:
                raise ValueError(f"{name} at offset {start} needs {arg} bytes past the end")
            raw = buf[pos:end]
            pos = end
            if kind == "str1":
                arg = raw.decode("utf-8", "surrogatepass")
            elif kind == "bytes1":
                arg = bytes(raw)
            else:
                arg = int.from_bytes(raw, "little", signed=True)
    elif kind == "u2":
        if pos + 2 > n:
            raise ValueError(f"truncated {name} at offset {start}")
        arg = buf[pos] | (buf[pos + 1] << 8)
        pos += 2
    elif kind in ("s4", "u4", "str4", "bytes4"):
        if pos + 4 > n:
            raise ValueError(f"truncated {name} at offset {start}")
        arg = int.from_bytes(buf[pos:pos + 4], "little", signed=(kind == "s4"))
        pos += 4
        if kind in ("str4", "bytes4"):
            end = pos + arg
            if end > n:
                raise ValueError(f"{name} at offset {start} needs {arg} bytes past the end")
            raw = buf[pos:end]
            pos = end
            arg = raw.decode("utf-8", "surrogatepass") if kind == "str4" else bytes(raw)
    elif kind == "f8":
        if pos + 8 > n:
            raise ValueError(f"truncated {name} at offset {start}")
        arg = _unpack_double(buf, pos)[0]
        pos += 8
    elif kind.startswith("names"):
        # CPython: ``readline()[:-1].decode("utf-8")`` twice (INST: "ascii"),
        # no escapes undone (pickletools' own reader undoes them)
        encoding = kind[6:]
        module, pos, whole = _line(buf, pos, n)
        gname, pos, whole_name = _line(buf, pos, n) if whole else (b"", pos, False)
        if not (whole and whole_name):
            # CPython reading a file still looks the name up: the last line,
            # without its newline, loses its last character (``[:-1]``)
            raise NameAtEnd(name, start, module.decode(encoding), gname.decode(encoding), n)
        # (module, name): a space-joined string would split "p six" wrongly
        arg = (module.decode(encoding), gname.decode(encoding))
    else:  # rare opcodes: pickletools' reader knows their text formats
        if name in _C_STRING_LINES:
            line_end = buf.find(b"\n", pos, n)
            if b"\0" in buf[pos:line_end if line_end >= 0 else n]:
                raise NulInLine(f"{name} at offset {start} has a NUL byte in its argument line "
                                "(the C unpickler reads the number up to it, the pure-Python "
                                "one fails)")
        stream = io.BytesIO(buf)
        stream.seek(pos)
        arg = _CODE2OP[code].arg.reader(stream)
        pos = stream.tell()
        if pos > n:
            raise ValueError(f"{name} at offset {start} runs past offset {n}")
    return name, arg, pos


def opcode_extent(buf: bytes, at: int) -> int:
    """Where the opcode at ``buf[at]`` ends, from its layout alone (its
    argument's length field or newlines), whether or not its content is
    valid; past ``len(buf)`` when the data ends first."""
    op = _CODE2OP.get(buf[at])
    if op is None or op.arg is None:
        return at + 1
    n, p, end = op.arg.n, at + 1, len(buf)
    if n >= 0:
        return p + n
    if n == pickletools.UP_TO_NEWLINE:
        for _ in range(2 if op.name in ("GLOBAL", "INST") else 1):
            i = buf.find(b"\n", p)
            if i < 0:
                return end + 1
            p = i + 1
        return p
    width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
             pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}[n]
    if p + width > end:
        return end + 1
    return p + width + max(0, int.from_bytes(buf[p:p + width], "little",
                                             signed=n == pickletools.TAKEN_FROM_ARGUMENT4))


def _line(buf: bytes, pos: int, n: int) -> tuple[bytes, int, bool]:
    """(the line at ``pos`` without its newline, the offset after it, whether
    it had one); a line cut off at ``n`` as ``readline()[:-1]`` leaves it."""
    end = buf.find(b"\n", pos, n)
    if end < 0:
        return buf[pos:n][:-1], n, False
    return buf[pos:end], end + 1, True


# text opcodes whose number the C unpickler parses as a C string (strtol,
# PyLong_FromString): it stops at a NUL byte where Python's int() fails
_C_STRING_LINES = frozenset(("INT", "LONG", "FLOAT", "PUT", "GET"))


class NulInLine(ValueError):
    """A number line that CPython's two unpicklers read differently."""


class NameAtEnd(ValueError):
    """A GLOBAL/INST whose lines run to the end of the data: malformed, but
    CPython reading a file looks up ``qualname`` before it fails."""

    def __init__(self, opcode: str, offset: int, module: str, name: str, end: int):
        self.opcode, self.module, self.name = opcode, module, name
        # no name line at all: only the module is imported
        self.qualname = f"{module}.{name}" if name else module
        super().__init__(f"{opcode} at offset {offset}: no newline before offset {end} "
                         f"(CPython would still look up {self.qualname!r})")


def iter_opcodes(buf: bytes, start: int = 0):
    """(opcode name, argument, position) for each opcode of an in-memory pickle
    (the one at ``start``), up to its STOP.

    The same stream ``pickletools.genops`` gives, several times faster for
    the opcodes torch pickles are made of; arguments are bounds-checked.
    """
    n = len(buf)
    pos = start
    while pos < n:
        begin = pos
        name, arg, pos = decode_opcode(buf, pos, n)
        yield name, arg, begin
        if name == "STOP":
            return


def scan_globals(data, display: str = "pickle", every_pickle: bool = False
                 ) -> list[tuple[str, str]]:
    """Every (opcode, module.name) a pickle names, without interpreting it.

    ``data``: the pickle's bytes; the listing ends at its first STOP, or with
    ``every_pickle`` goes on through the pickles after it (what a reader
    loading pickle after pickle reaches). STACK_GLOBAL takes its two names
    from the stack; a small symbolic stack follows strings through the memo
    (``GET``) so obfuscated names are still listed. Also lists EXT codes and
    persistent ids. A raw listing for reports and for judging what does not
    parse; decisions come from interpreting the pickle.
    """
    data = bytes(data)
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data):
        pos = _list_names(data, pos, found)
        if not every_pickle:
            break
    return found


def _list_names(data: bytes, start: int, found: list) -> int:
    """List the names of the pickle at ``start``; the offset after its STOP
    (the end of the data where it does not parse)."""
    sym: list[Any] = []          # strings where known, None for anything else
    memo: dict[int, Any] = {}
    end = len(data)
    try:
        for name, arg, at in iter_opcodes(data, start):
            if name == "STOP":
                end = at + 1
            if name in ("GLOBAL", "INST"):
                module, gname = arg
                found.append((name, f"{module}.{gname}"))
                sym.append(None)
            elif name == "STACK_GLOBAL":
                gname = sym.pop() if sym else None
                module = sym.pop() if sym else None
                if isinstance(module, str) and isinstance(gname, str):
                    found.append((name, f"{module}.{gname}"))
                else:
                    found.append((name, "<computed name>"))
                sym.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append((name, f"<copyreg extension {arg}>"))
                sym.append(None)
            elif name in ("PERSID", "BINPERSID"):
                found.append((name, "<persistent id>"))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = sym[-1] if sym else None
            elif name == "MEMOIZE":
                memo[len(memo)] = sym[-1] if sym else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                sym.append(memo.get(int(arg)))
            elif isinstance(arg, str) and name in _PUSH_ARG:
                sym.append(arg)
            elif name == "POP" and sym:
                sym.pop()
            elif name not in ("PROTO", "FRAME", "STOP", "MARK"):
                sym.append(None)
            if len(sym) > 64:   # only the top matters
                del sym[:32]
    except Exception as e:  # noqa: BLE001 - a report, not a reader
        if isinstance(e, NameAtEnd):
            found.append((e.opcode, e.qualname))
        found.append(("ERROR", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"))
    return end


_OPCODE_BYTES = frozenset(ord(op.code) for op in pickletools.opcodes)


def starts_a_pickle(prefix: bytes) -> bool:
    """Whether CPython's unpickler, given bytes starting with ``prefix`` would do
    anything: PROTO 0-5 and an opcode next; or a pickle (protocol 0/1 has no
    PROTO) that parses to its STOP within ``prefix``; or opcodes that name a
    dangerous global before they stop parsing (CPython's unpickler runs what
    comes before the fault)."""
    from .names import is_dangerous

    if not prefix or prefix[0] not in _OPCODE_BYTES:
        return False
    if prefix[0] == 0x80:
        return len(prefix) >= 3 and prefix[1] <= 5 and prefix[2] in _OPCODE_BYTES
    try:
        if any(name == "STOP" for name, _, _ in iter_opcodes(prefix)):
            return True
    except Exception:  # noqa: BLE001 - sniffing: what does not parse may still name something
        pass
    return any(op in ("GLOBAL", "INST", "STACK_GLOBAL") and is_dangerous(name)
               for op, name in scan_globals(prefix))
