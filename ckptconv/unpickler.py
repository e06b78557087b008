"""A restricted pickle reader: an opcode interpreter that never imports or
calls anything named by the file.

It walks the opcodes with ``pickletools.genops`` and builds plain Python
values itself, the way torch's ``_weights_only_unpickler`` does. ``GLOBAL``
and ``STACK_GLOBAL`` only push a ``Global(module, name)`` marker; what a
``REDUCE``/``INST``/``OBJ`` of it means is decided by ``call`` (allowlisted
constructors of the caller's choosing, everything else refused with
``UnsafePickleError`` naming the callable). ``NEWOBJ`` + ``BUILD`` of a class
become an inert ``ObjectRecord`` unless the class lives in a module that can
run code (``os``, ``subprocess``, ``builtins`` ...), which is refused too.

Hardening against hostile pickles (each refusal is one line naming the name):
a dangerous name is refused when it is first *named* (``GLOBAL``,
``STACK_GLOBAL``, ``INST``), since ``pickle`` imports it right there; dotted
names are checked segment by segment (``argparse._os.system``); ``EXT*``
(copyreg registry) and non-storage persistent ids are refused; ``BUILD``
may not set dunder attributes (the ``__setstate__`` override trick) nor
shadow ``OrderedDict`` methods; keys are bounded before hashing; the result
is bounded in depth, must be acyclic, and may not expand through shared
memo entries ("billion laughs") beyond ``MAX_EXPANSION`` nodes.

Ground truth: CPython ``Lib/pickle.py`` and ``Lib/pickletools.py`` (opcode
semantics), ``torch/_weights_only_unpickler.py`` (the safe pattern).
"""
from __future__ import annotations

import gc
import io
import pickletools
import struct
from collections import OrderedDict
from typing import Any, Callable

from .errors import FormatError, UnsafePickleError
from .tree import ObjectRecord

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

# Modules whose names in a pickle mean "this can run code". A NEWOBJ/BUILD or a
# bare reference to anything in them is refused, not recorded.
DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy",
    "pickle", "_pickle", "cPickle", "marshal", "shutil", "socket", "functools", "operator",
    "code", "codeop", "types", "ctypes", "pty", "webbrowser", "multiprocessing", "asyncio",
    "signal", "threading", "_thread", "io", "_io", "pathlib", "tempfile", "commands", "platform",
    "pdb", "bdb", "timeit", "trace", "cProfile", "profile", "urllib", "http", "requests", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "zipimport", "pkgutil", "site", "sysconfig", "inspect",
    "ast", "dis", "gc", "copyreg", "copy_reg", "_codecs", "codecs", "dill", "cloudpickle",
    "joblib", "numpy.testing", "numpy.f2py", "numpy.distutils", "torch._C", "torch.jit",
    "torch.hub", "torch.serialization", "torch.storage", "torch.utils", "torch._dynamo",
    "torch._inductor", "torch.ops", "torch.library", "torch.distributed", "torch.multiprocessing",
    "__main__.os", "setuptools", "distutils", "venv", "ensurepip", "imp", "glob", "fnmatch",
    "logging", "unittest", "doctest", "idlelib", "tkinter", "turtle", "sqlite3", "shelve", "dbm",
    "yaml", "jinja2", "mako", "paramiko", "fabric", "invoke", "_posixsubprocess", "_winapi",
    "msvcrt", "winreg", "resource", "fcntl", "mmap", "readline", "rlcompleter", "ssl", "select",
    "selectors", "uuid", "random", "secrets", "base64", "zlib", "bz2", "lzma", "gzip", "tarfile",
    "zipfile", "abc", "contextlib", "atexit", "weakref", "warnings", "traceback", "linecache",
    "tokenize", "compileall", "py_compile", "keyword", "string", "re", "sre_compile",
    "sre_parse", "ntpath", "posixpath", "genericpath", "stat", "getpass", "pwd", "grp",
    "crypt", "spwd", "termios", "tty", "email", "mailbox", "mimetypes", "cgi", "wsgiref",
    "socketserver", "xml", "html", "json", "csv", "configparser", "plistlib", "netrc",
    # functions of otherwise harmless packages that load pickles, write files or run code
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap", "numpy.lib",
    "numpy.ctypeslib", "numpy.core._internal", "numpy._core._internal", "torch.load",
    "torch.save", "torch.fx", "torch.package", "torch.export", "torch._export", "torch._ops",
    "torch._classes", "torch.classes", "torch.testing", "torch.backends", "torch.compiler",
    "pandas.read_pickle", "pandas.io", "pydoc", "antigravity", "this", "turtledemo",
    "_osx_support", "_aix_support", "pydoc_data", "lib2to3", "ensurepip", "nturl2path",
    "_ctypes", "_socket", "_signal", "_multiprocessing", "_winreg", "posixsubprocess",
    "_xxsubinterpreters", "_interpreters", "_testcapi", "_testinternalcapi",
)

# Attribute names that, anywhere in a dotted name, reach code execution:
# ``argparse._os.system`` (a module imported under another name),
# ``collections.abc.sys.modules`` ... A leading underscore does not hide them.
_DANGEROUS_SEGMENTS = frozenset((
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "importlib", "pickle",
    "cPickle", "marshal", "shutil", "ctypes", "pty", "runpy", "socket", "commands", "system",
    "popen", "popen2", "popen3", "popen4", "exec", "execfile", "eval", "compile", "getattr",
    "setattr", "delattr", "globals", "locals", "vars", "breakpoint", "import_module", "loads",
    "spawn", "spawnv", "spawnl", "execv", "execve", "execvp", "fork", "kill", "check_output",
    "check_call", "getoutput", "getstatusoutput", "run_path", "run_module",
))
# Dunder first segments that name harmless pseudo-modules (TorchScript, scripts).
_HARMLESS_DUNDER_ROOTS = frozenset(("__torch__", "__main__", "__mp_main__"))


def is_dangerous(qualname: str) -> bool:
    """Whether a dotted name from a pickle can lead to running code.

    Checked: every dotted prefix against ``DANGEROUS_MODULES`` (a module or
    one of its functions), every later segment against module aliases and
    code-running function names (``argparse._os.system``), and dunder
    segments (``builtins.__import__``, ``Tensor.__reduce_ex__``).
    """
    q = str(qualname)
    if any(q == d or q.startswith(d + ".") for d in DANGEROUS_MODULES):
        return True
    parts = q.split(".")
    if any(not p for p in parts):  # "os..system", ".os": never a real class
        return True
    first = parts[0]
    if first.startswith("__") and first.endswith("__") and first not in _HARMLESS_DUNDER_ROOTS:
        return True
    for seg in parts[1:]:
        if seg.startswith("__") and seg.endswith("__"):
            return True
        if seg in _DANGEROUS_SEGMENTS or seg.lstrip("_") in _DANGEROUS_SEGMENTS:
            return True
    return False


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded one-line repr for messages: never deep, never long."""
    try:
        if isinstance(value, (tuple, list)) and len(value) > 8:
            text = f"{type(value).__name__} of {len(value)} items"
        elif isinstance(value, (tuple, list, dict, set, frozenset)):
            text = reprlib_repr(value)
        else:
            text = repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reprlib_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxtuple, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, 4, 40, 40
    return r.repr(value)


class Global:
    """A name from GLOBAL/STACK_GLOBAL/INST: recorded, never imported."""

    __slots__ = ("module", "name", "qualname")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.qualname = f"{module}.{name}"

    def __repr__(self):
        return self.qualname

    def __eq__(self, other):
        return isinstance(other, Global) and other.qualname == self.qualname

    def __hash__(self):
        return hash(self.qualname)


class Pending:
    """A value finished by a later BUILD (numpy arrays, dtypes): ``value()`` at the end."""

    def build(self, state) -> None:
        raise NotImplementedError

    def value(self):
        raise NotImplementedError


_PLAIN_KEYS = frozenset((str, bytes, int, float, bool, complex, type(None)))


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
                     ("SHORT_BINBYTES", "bytes1"), ("BINBYTES", "bytes4"), ("LONG1", "long1")):
    _KIND[ord(pickletools.opcodes[[o.name for o in pickletools.opcodes].index(_name)].code)] = _kind
_CODE2OP = {ord(o.code): o for o in pickletools.opcodes}


_MISSING = object()
_unpack_double = struct.Struct(">d").unpack_from


def _decode(buf: bytes, pos: int, n: int) -> tuple[str, Any, int]:
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
    else:  # rare opcodes: pickletools' reader knows their text formats
        stream = io.BytesIO(buf)
        stream.seek(pos)
        arg = _CODE2OP[code].arg.reader(stream)
        pos = stream.tell()
    return name, arg, pos


def iter_opcodes(buf: bytes):
    """(opcode name, argument, position) for each opcode of an in-memory pickle.

    The same stream ``pickletools.genops`` gives, several times faster for
    the opcodes torch pickles are made of; arguments are bounds-checked.
    """
    n = len(buf)
    pos = 0
    while pos < n:
        start = pos
        name, arg, pos = _decode(buf, pos, n)
        yield name, arg, start
        if name == "STOP":
            return


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
        """A Global left in the result as a value (e.g. a dtype argument)."""
        if is_dangerous(g.qualname):
            raise UnsafePickleError(f"{self.display}: pickle references {g.qualname} "
                                    "(a callable that can run code; nothing was executed)")
        return ObjectRecord(g.qualname, kind="global")

    # --- the interpreter --------------------------------------------------------

    def load(self, data: bytes | io.BufferedIOBase) -> Any:
        """Interpret one pickle: bytes in memory, or a stream positioned at its start
        (left just after its STOP opcode)."""
        # A pickle builds many small containers and no reference cycles (they
        # are refused): the cyclic GC would only rescan them again and again.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                return self._load_bytes(bytes(data))
            return self._load_ops((op.name, arg) for op, arg, _ in pickletools.genops(data))
        except (ValueError, EOFError, IndexError, TypeError, OverflowError, UnicodeDecodeError,
                MemoryError, KeyError, AttributeError, RecursionError) as e:
            raise FormatError(f"{self.display}: corrupt or truncated pickle ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from e
        finally:
            if gc_was_on:
                gc.enable()

    def _load_ops(self, ops) -> Any:
        """The plain loop: every opcode through ``_step``."""
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        step = self._step
        for name, arg in ops:
            if name == "STOP":
                return self._stop(stack)
            stack = step(name, arg, stack, metastack, memo)
        raise FormatError(f"{self.display}: truncated pickle (no STOP opcode)")

    def _load_bytes(self, buf: bytes) -> Any:
        """The fast loop for a pickle in memory: the opcodes torch pickles are
        made of are decoded and run inline (one byte dispatch, no generator,
        no per-opcode call); any other opcode goes through ``_step``, which
        runs every opcode exactly as the inline code does."""
        d = self.display
        n = len(buf)
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        step, call, persistent_load = self._step, self._call, self.persistent_load
        from_bytes = int.from_bytes
        pos = 0
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
                    raise FormatError(f"{d}: corrupt pickle (memo {buf[pos + 1]} read before written)")
                stack.append(v)
                pos += 2
            elif code == 0x72:  # LONG_BINPUT
                if pos + 5 > n:
                    raise ValueError(f"truncated LONG_BINPUT at offset {pos}")
                if not stack:
                    raise FormatError(f"{d}: corrupt pickle (stack underflow)")
                i = from_bytes(buf[pos + 1:pos + 5], "little")
                if i > MAX_MEMO:  # bounds the memo: other puts use indexes < 256
                    raise FormatError(f"{d}: corrupt pickle (memo index {i} beyond {MAX_MEMO})")
                memo[i] = stack[-1]
                pos += 5
            elif code == 0x6A:  # LONG_BINGET
                if pos + 5 > n:
                    raise ValueError(f"truncated LONG_BINGET at offset {pos}")
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
                        raise ValueError(f"truncated BINUNICODE at offset {pos}")
                    start = pos + 5
                    end = start + from_bytes(buf[pos + 1:start], "little")
                else:
                    start = pos + 2
                    end = start + buf[pos + 1]
                if end > n:
                    raise ValueError(f"string at offset {pos} needs {end - n} bytes past the end")
                stack.append(buf[start:end].decode("utf-8", "surrogatepass"))
                pos = end
            elif code == 0x4D:  # BININT2
                if pos + 3 > n:
                    raise ValueError(f"truncated BININT2 at offset {pos}")
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
                    raise ValueError(f"truncated BININT at offset {pos}")
                stack.append(from_bytes(buf[pos + 1:pos + 5], "little", signed=True))
                pos += 5
            elif code == 0x2E:  # STOP
                return self._stop(stack)
            else:
                name, arg, pos = _decode(buf, pos, n)
                if name == "STOP":
                    return self._stop(stack)
                stack = step(name, arg, stack, metastack, memo)
        raise FormatError(f"{d}: truncated pickle (no STOP opcode)")

    def _stop(self, stack):
        if len(stack) != 1:
            raise FormatError(f"{self.display}: corrupt pickle (stack holds {len(stack)} at STOP)")
        return self.finish(stack.pop())

    def _step(self, name: str, arg, stack: list, metastack: list, memo: dict) -> list:
        """Run one opcode (any but STOP); returns the stack, which MARK and
        the opcodes that pop a mark replace."""
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

        if name == "BINPUT" or name == "LONG_BINPUT" or name == "PUT":
            if int(arg) < 0:
                raise FormatError(f"{d}: corrupt pickle (bad memo index {arg})")
            if int(arg) > MAX_MEMO:
                raise FormatError(f"{d}: corrupt pickle (memo index {arg} beyond {MAX_MEMO})")
            memo[int(arg)] = top()
        elif name == "BINGET" or name == "LONG_BINGET" or name == "GET":
            v = memo.get(int(arg), _MISSING)
            if v is _MISSING:
                raise FormatError(f"{d}: corrupt pickle (memo {arg} read before written)")
            stack.append(v)
        elif name in _PUSH_ARG:
            stack.append(arg)
        elif name == "MARK":
            metastack.append(stack)
            stack = []
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "TUPLE":
            items = pop_mark()
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "REDUCE":
            if len(stack) < 2:
                raise FormatError(f"{d}: corrupt pickle (stack underflow)")
            args = stack.pop()
            func = stack.pop()
            stack.append(self._call(func, args, "REDUCE"))
        elif name in ("PERSID", "BINPERSID"):
            if name == "BINPERSID":
                pid = top()
                stack.pop()
            else:
                pid = arg
            stack.append(self.persistent_load(pid))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "NEWFALSE":
            stack.append(False)
        elif name == "NEWTRUE":
            stack.append(True)
        elif name == "GLOBAL":
            module, _, gname = str(arg).partition(" ")
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
            module, _, gname = str(arg).partition(" ")
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


def scan_globals(data, display: str = "pickle") -> list[tuple[str, str]]:
    """Every (opcode, module.name) a pickle names, without interpreting it.

    ``data`` is the pickle's bytes or a stream positioned at its start (it is
    left just after the STOP opcode). STACK_GLOBAL takes its two names from
    the stack; a small symbolic stack follows strings through the memo
    (``GET``) so obfuscated names are still listed. Also lists EXT codes and
    persistent ids. A raw listing for reports; decisions come from
    interpreting the pickle.
    """
    found: list[tuple[str, str]] = []
    sym: list[Any] = []          # strings where known, None for anything else
    memo: dict[int, Any] = {}
    if isinstance(data, (bytes, bytearray, memoryview)):
        ops = iter_opcodes(bytes(data))
    else:
        ops = ((op.name, arg, pos) for op, arg, pos in pickletools.genops(data))
    try:
        for name, arg, _ in ops:
            if name in ("GLOBAL", "INST"):
                module, _, gname = str(arg).partition(" ")
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
        found.append(("ERROR", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"))
    return found


Constructor = Callable[..., Any]
