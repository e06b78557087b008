"""The attack classes of the public scanner suites (picklescan, modelscan,
fickling, ModelAudit, pickle injectors), each reproduced by our own file,
and what every verb does with it. The table in SECURITY.md is this test's
output (``CKPTCONV_UPDATE_SECURITY=1`` rewrites it): the test fails when a
row's scan verdict differs from the table's, and whenever a verb accepts a
pickle payload."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

import malicious_corpus as mc

from ckptconv.cli import main

REPO = Path(__file__).resolve().parent.parent
SECURITY_MD = REPO / "SECURITY.md"
FIXTURES = Path(__file__).parent / "code_on_load"
START, END = "<!-- attack-table:start -->", "<!-- attack-table:end -->"
VERBS = ("inspect", "convert", "scan", "verify", "check")
BY = {p.name: p for p in mc.corpus()}
SAFE_PICKLE = pickle.dumps({"w": [1.0, 2.0]}, protocol=2)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    return buf.getvalue()


def _injected_state_dict() -> bytes:
    """A pickle injector's output: a real state dict pickle with a payload
    run first (its value popped) and the original opcodes after it."""
    real = pickle.dumps({"fc.weight": [0.5, 0.25]}, protocol=2)
    payload = mc.call1(mc.g("posix", "system"), mc.u(mc.CMD)) + mc.POP
    return real[:2] + payload + real[2:]


def _frame_crossing() -> bytes:
    from test_unpickler import frame_crossing_exploit

    return frame_crossing_exploit()


def _encrypted_zip() -> bytes:
    b = bytearray(_zip({"archive/data.pkl": SAFE_PICKLE}))
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(sig)
        while i >= 0:
            b[i + off] |= 1
            i = b.find(sig, i + 4)
    return bytes(b)


def _onnx_custom() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("PyOp", ["x"], ["y"], domain="ai.onnx.contrib")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    return model.SerializeToString()


# the payload the container rows carry (GLOBAL + REDUCE of os.system)
PAYLOAD = BY["posix_system_protocol2"].data
# (class, where the suites have it, file name, the malicious corpus entry it holds)
PICKLE_CLASSES = [
    ("GLOBAL + REDUCE of os.system, protocol 2", "picklescan, modelscan, fickling, ModelAudit",
     "reduce.pkl", "posix_system_protocol2"),
    ("text protocol 0 pickle (`cos\\nsystem`)", "picklescan, fickling",
     "proto0.pkl", "os_system_protocol0"),
    ("eval/exec/compile under Python 2 names", "picklescan, ModelAudit",
     "eval.pkl", "builtins_eval_py2_name"),
    ("STACK_GLOBAL with names from the memo", "ModelAudit, picklescan",
     "stack_global.pkl", "memo_obfuscated_stack_global"),
    ("INST / OBJ / NEWOBJ of FunctionType", "fickling", "newobj.pkl", "newobj_function_type"),
    ("getattr / import_module chains", "ModelAudit, fickling",
     "getattr.pkl", "getattr_import_chain"),
    ("functools.partial / operator helpers", "ModelAudit", "partial.pkl", "functools_partial"),
    ("nested deserializers (pickle.loads, marshal, numpy.load, torch.load)",
     "picklescan, ModelAudit", "nested.pkl", "nested_pickle_loads"),
    ("code runners in stdlib modules (runpy, cProfile, timeit, pydoc, bdb)", "picklescan",
     "runpy.pkl", "runpy_run_code"),
    ("a class from an innocent-looking module (webbrowser, wave ...)", "picklescan",
     "innocent.pkl", "innocent_module_class"),
    ("copyreg extension registry (EXT1/2/4)", "fickling", "ext.pkl", "ext2_copyreg"),
    ("payload in a torch rebuild's arguments", "fickling, ModelAudit",
     "rebuild.pkl", "rebuild_tensor_v2_hidden_payload"),
    ("BUILD sets __setstate__ (state override)", "fickling", "setstate.pkl", "setstate_override"),
    ("dotted name through a module alias (argparse._os.system)", "ModelAudit",
     "dotted.pkl", "dotted_alias_name"),
    ("payload in a persistent id", "fickling", "persid.pkl", "persistent_id_hides_payload"),
]
# (class, where the suites have it, file name, bytes or a fixture path)
CLASSES = [(cls, suites, name, BY[entry].data) for cls, suites, name, entry in PICKLE_CLASSES]
CLASSES += [
    ("injected into a real state dict pickle (runs first, value popped)", "pickle injectors",
     "injected.pkl", _injected_state_dict()),
    ("payload in a torch zip's data.pkl", "picklescan, modelscan, fickling",
     "zip.pt", mc.torch_zip(PAYLOAD)),
    ("payload in another .pkl member of a torch zip", "picklescan",
     "zip_extra.pt", mc.torch_zip_extra(PAYLOAD)),
    ("pickle in a zip member with an innocent name (data.txt)", "picklescan",
     "renamed.zip", _zip({"model/data.txt": PAYLOAD})),
    ("legacy torch file (pre-1.6), payload in the main pickle", "fickling",
     "legacy.pt", mc.legacy(PAYLOAD)),
    ("TorchScript archive, payload in constants.pkl", "fickling",
     "script.pt", mc.torchscript(PAYLOAD)),
    ("second pickle after STOP (safe first, malicious second)", "picklescan, ModelAudit",
     "two.pkl", SAFE_PICKLE + PAYLOAD),
    ("malformed pickle that runs before it fails", "picklescan",
     "malformed.pkl", b"cos\nsystem\n(S'touch canary'\ntR\xff"),
    ("FRAME shorter than the opcode inside it (C unpickler resynchronises)", "(found here)",
     "frame.pt", mc.torch_zip(_frame_crossing())),
    ("numpy object array (.npy)", "modelscan, picklescan",
     "objects.npy", mc.npy_object_file(PAYLOAD)),
    ("numpy object array spelled 'object' (or '<O', 'O8'; numpy reads all as objects)",
     "(found here)", "object_dtype.npy", mc.npy_object_file(PAYLOAD, "object")),
    ("pickle in front of another format (polyglot)", "fickling",
     "poly.h5", BY["os_system_protocol0"].data + b"\0" * 600),
    ("7z archive", "picklescan", "model.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(64)),
    ("encrypted zip member", "ModelAudit", "encrypted.zip", _encrypted_zip()),
    ("zip member path traversal (../)", "ModelAudit",
     "slip.pt", _zip({"archive/data.pkl": SAFE_PICKLE, "../../outside.pkl": SAFE_PICKLE})),
    ("Keras Lambda layer in .h5", "modelscan, ModelAudit", "lambda.h5", FIXTURES / "lambda.h5"),
    ("Keras Lambda layer in .keras", "modelscan, ModelAudit",
     "lambda.keras", FIXTURES / "lambda.keras"),
    ("SavedModel with tf.py_function (EagerPyFunc)", "modelscan, ModelAudit",
     "saved_model.pb", FIXTURES / "savedmodel_pyfunc" / "saved_model.pb"),
    ("ONNX custom-op domain (ai.onnx.contrib PyOp)", "ModelAudit", "custom.onnx", None),
]


def _cli(*args) -> int:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        return main([str(a) for a in args])


def verb_codes(tmp: Path, name: str, content) -> list[int]:
    d = tmp / name.replace(".", "_")
    d.mkdir()
    f = d / name
    if isinstance(content, Path):
        f.write_bytes(content.read_bytes())
    else:
        f.write_bytes(_onnx_custom() if content is None else content)
    codes = []
    for verb in VERBS:
        args = (verb, f, d / "out.safetensors") if verb == "convert" else (verb, f)
        codes.append(_cli(*args))
    return codes


def render(rows: list[tuple[str, str, str, list[int]]]) -> str:
    lines = ["| attack class | in the suites of | our file | " + " | ".join(VERBS) + " |",
             "|---|---|---|" + "---|" * len(VERBS)]
    for cls, suites, name, codes in rows:
        lines.append(f"| {cls} | {suites} | `{name}` | " + " | ".join(map(str, codes)) + " |")
    return "\n".join(lines)


def test_attack_table_matches_security_md(tmp_path):
    rows = [(cls, suites, name, verb_codes(tmp_path, name, content))
            for cls, suites, name, content in CLASSES]
    for cls, _, name, codes in rows:
        scan_code = codes[VERBS.index("scan")]
        expected = 1 if name in ("model.7z", "encrypted.zip", "slip.pt") else 3
        assert scan_code == expected, (cls, codes)
        if name.endswith((".pkl", ".pt", ".npy")) and name != "slip.pt":
            assert 0 not in codes, (cls, codes)          # no verb accepts a pickle payload
            if name != "objects.npy" or codes[0] != 1:   # (.npy: once a reader claims it)
                assert {codes[VERBS.index(v)] for v in ("inspect", "convert", "verify")} == {3}, \
                    (cls, codes)   # refused as unsafe by every verb that reads it
    table = render(rows)
    text = SECURITY_MD.read_text()
    if os.environ.get("CKPTCONV_UPDATE_SECURITY"):
        a, b = text.index(START) + len(START), text.index(END)
        text = text[:a] + "\n" + table + "\n" + text[b:]
        SECURITY_MD.write_text(text)
    documented = {line.split(" | ")[2]: line.split(" | ")[3 + VERBS.index("scan")]
                  for line in text[text.index(START):text.index(END)].splitlines()[3:]}
    assert documented == {f"`{name}`": str(codes[VERBS.index("scan")])
                          for _, _, name, codes in rows}, \
        "SECURITY.md's table is stale: run with CKPTCONV_UPDATE_SECURITY=1\n" + table
