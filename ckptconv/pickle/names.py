"""Names a pickle may mention, and which of them can run code.

A pickle reaches Python objects only by name: ``GLOBAL``/``INST`` (text
``module\nname\n``), ``STACK_GLOBAL`` (two strings from the stack) and the
copyreg extension registry (``EXT1/2/4``: a number that ``copyreg`` maps to
a name). ``pickle`` imports the module as soon as it reads the name, so a
dangerous name is refused where it is *named*, whether or not it is called.

Ground truth: CPython ``Lib/pickle.py`` (``find_class``: Python 2 names are
mapped through ``Lib/_compat_pickle.py`` for protocols < 3, dotted names are
walked attribute by attribute for protocol 4+).
"""
from __future__ import annotations

from typing import Any

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
    segments (``builtins.__import__``, ``Tensor.__reduce_ex__``). A Python 2
    spelling is checked as the name ``pickle`` maps it to as well
    (``urllib2.urlopen`` is ``urllib.request.urlopen``).
    """
    q = str(qualname)
    py3 = python3_name(q)
    if py3 != q and _is_dangerous(py3):
        return True
    return _is_dangerous(q)


def checked_allow_globals(allow_globals, known=()) -> tuple[str, ...]:
    """This run's ``--allow-global MODULE.NAME`` names (``allow_globals=``), checked:
    each a dotted name of identifiers, none that can run code unless ``known``
    (a reader's shipped list of inert framework names) has it. A bad one is a
    usage error naming it."""
    from ..errors import UsageError

    names = []
    for name in allow_globals or ():
        if not isinstance(name, str) or name.count(".") < 1 or not all(
                part.isidentifier() for part in name.split(".")):
            raise UsageError(f"--allow-global {name!r}: not a MODULE.NAME")
        if is_dangerous(name) and name not in known:
            raise UsageError(f"--allow-global {name}: refused, a name that can run code "
                             "(a file naming it would run it when it is unpickled)")
        names.append(name)
    return tuple(names)


def python3_name(qualname: str) -> str:
    """The name CPython's ``find_class`` imports for a protocol 0-2 pickle's
    ``module.name`` (``Lib/_compat_pickle.py``: ``NAME_MAPPING``, ``IMPORT_MAPPING``)."""
    import _compat_pickle

    module, _, name = qualname.rpartition(".")
    # the module part is everything up to the last dot the file wrote; try the
    # longest module prefix the mapping knows
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        return f"{module}.{name}"
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = ".".join(parts[:i])
        if mod in _compat_pickle.IMPORT_MAPPING:
            return ".".join([_compat_pickle.IMPORT_MAPPING[mod]] + parts[i:])
    return qualname


def _is_dangerous(q: str) -> bool:
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
