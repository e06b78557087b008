"""Reading ONNX models: a small protobuf wire-format scanner over a memory
map that finds every weight and the byte offset of its ``raw_data`` (no
protobuf object of the whole model is built). See ``adapters/onnx`` for
what counts as a weight and its name.

Sources of truth: ``onnx/onnx.proto``, ``onnx/external_data_helper.py`` and
the protobuf wire format (https://protobuf.dev/programming-guides/encoding/).
"""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError
from ckptconv.tensor import FileHandle, FileSource, LazyTensor, StoredTensor, TensorRef

from .._io import DecodeError, encode_varint, read_varint

MAX_SUBGRAPH_DEPTH = 100

# TensorProto.DataType -> canonical dtype name (onnx/onnx.proto)
ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
    15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz",
    19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4", 24: "float8_e8m0fnu",
}
ONNX_CODES = {v: k for k, v in ONNX_DTYPES.items()}
ONNX_TYPE_NAMES = {8: "STRING", 23: "FLOAT4E2M1", 25: "UINT2", 26: "INT2"}
PACKED_4BIT = ("int4", "uint4")   # two elements per byte in raw_data
_TYPED_FIELDS = (3, 4, 5, 6, 7, 10, 11)   # segment and the typed value fields of TensorProto


# --- protobuf wire format -------------------------------------------------------

def iter_fields(buf, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of the message in ``buf[start:end]``.

    Unlike ``_io.iter_fields`` (memoryviews), values of length-delimited and
    fixed-width fields are absolute (start, end) spans: the reader needs the
    file offset of every ``raw_data``."""
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise DecodeError(f"field number 0 at offset {pos}")
        if wire == 0:
            value, pos = read_varint(buf, pos, end)
        elif wire == 2:
            n, pos = read_varint(buf, pos, end)
            if pos + n > end:
                raise DecodeError(f"field {num} needs {n} bytes at offset {pos}, "
                                  f"its message ends at {end}")
            value, pos = (pos, pos + n), pos + n
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wire} at offset {pos}")
        if pos > end:
            raise DecodeError(f"field {num} runs past the end of its message at offset {pos}")
        yield num, wire, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _packed_varints(buf, span) -> list[int]:
    out, pos = [], span[0]
    while pos < span[1]:
        v, pos = read_varint(buf, pos, span[1])
        out.append(v)
    return out


def len_field(num: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited field."""
    return encode_varint(num << 3 | 2) + encode_varint(length)


# --- reading ------------------------------------------------------------------

@dataclass
class OnnxTensor:
    """One weight found in the model, with where it lives in the protobuf."""

    name: str
    kind: str                      # initializer | constant | constant-attr | sparse
    ref: TensorRef
    proto_path: tuple              # steps from the ModelProto to the TensorProto / AttributeProto
    raw_span: tuple[int, int] | None = None   # raw_data bytes inside the .onnx file
    external: bool = False
    attr_form: str | None = None   # value_float, value_floats, value_int, value_ints


@dataclass
class OnnxScan:
    tensors: list[OnnxTensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class _Scanner:
    """Walks a serialized ModelProto and builds lazy refs for its weights."""

    def __init__(self, path: Path, handle: FileHandle, buf):
        self.path, self.handle, self.buf = path, handle, buf
        self.folder = path.resolve().parent
        self.external_handles: dict[str, FileHandle] = {}
        self.scan = OnnxScan()
        self.names: set[str] = set()
        self.counts = {"initializers": 0, "constants": 0, "sparse": 0, "in_subgraphs": 0}

    def _what(self, name: str) -> str:
        return f"{self.handle.display}: tensor '{name}'"

    def fail(self, what: str):
        raise FormatError(f"{self.handle.display}: {what}")

    def model(self) -> OnnxScan:
        buf, info = self.buf, self.scan.info
        opsets = []
        graph_span = None
        for num, wire, v in iter_fields(buf, 0, len(buf)):
            if num == 1 and wire == 0:
                info["ir_version"] = v
            elif num == 2 and wire == 2:
                info["producer"] = _text(buf, v)
            elif num == 3 and wire == 2:
                info["producer_version"] = _text(buf, v)
            elif num == 7 and wire == 2:
                graph_span = v
            elif num == 8 and wire == 2:
                domain, version = "", 0
                for n2, w2, v2 in iter_fields(buf, *v):
                    if n2 == 1 and w2 == 2:
                        domain = _text(buf, v2)
                    elif n2 == 2 and w2 == 0:
                        version = v2
                opsets.append(f"{domain or 'ai.onnx'}:{version}")
            elif num == 14 and wire == 2:
                key, value = self._string_entry(v)
                self.scan.metadata[key] = value
            elif num == 25 and wire == 2:
                self.scan.skipped.append("functions (weights in model-local functions are not read)")
        if "ir_version" not in info:
            self.fail("not an ONNX model (no ir_version)")
        if graph_span is None:
            self.fail("ONNX model without a graph")
        if opsets:
            info["opset"] = ", ".join(opsets)
        self.graph(graph_span, "", ("graph",))
        info.update({k: v for k, v in self.counts.items() if v})
        if self.external_handles:
            info["external_data"] = ", ".join(sorted(self.external_handles))
        return self.scan

    def _string_entry(self, span) -> tuple[str, str]:
        key = value = ""
        for num, wire, v in iter_fields(self.buf, *span):
            if num == 1 and wire == 2:
                key = _text(self.buf, v)
            elif num == 2 and wire == 2:
                value = _text(self.buf, v)
        return key, value

    def graph(self, span, prefix: str, ppath: tuple) -> None:
        if len(ppath) > 3 * MAX_SUBGRAPH_DEPTH:
            self.fail(f"subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep at '{prefix}'")
        inits, sparse, nodes = [], [], []
        counters = {"node": 0, "initializer": 0, "sparse_initializer": 0}
        for num, wire, v in iter_fields(self.buf, *span):
            if wire != 2:
                continue
            if num == 1:
                nodes.append((v, counters["node"]))
                counters["node"] += 1
            elif num == 5:
                inits.append((v, counters["initializer"]))
                counters["initializer"] += 1
            elif num == 15:
                sparse.append((v, counters["sparse_initializer"]))
                counters["sparse_initializer"] += 1
        for v, i in inits:
            self.tensor(v, prefix, ppath + (("initializer", i),), "initializer")
        for v, i in sparse:
            self.sparse(v, None, prefix, ppath + (("sparse_initializer", i),))
        for v, i in nodes:
            self.node(v, i, prefix, ppath + (("node", i),))

    def node(self, span, index: int, prefix: str, ppath: tuple) -> None:
        buf = self.buf
        outputs, name, op, domain, attrs = [], "", "", "", []
        for num, wire, v in iter_fields(buf, *span):
            if wire != 2:
                continue
            if num == 2:
                outputs.append(_text(buf, v))
            elif num == 3:
                name = _text(buf, v)
            elif num == 4:
                op = _text(buf, v)
            elif num == 5:
                attrs.append(v)
            elif num == 7:
                domain = _text(buf, v)
        label = name or f"{op}_{index}"
        is_constant = op == "Constant" and domain in ("", "ai.onnx")
        for a, aspan in enumerate(attrs):
            aname, tensor_span, sparse_span, graphs = "", None, None, []
            for num, wire, v in iter_fields(buf, *aspan):
                if num == 1 and wire == 2:
                    aname = _text(buf, v)
                elif num == 5 and wire == 2:
                    tensor_span = v
                elif num == 22 and wire == 2:
                    sparse_span = v
                elif num == 6 and wire == 2:
                    graphs.append((v, None))
                elif num == 11 and wire == 2:
                    graphs.append((v, len(graphs)))
            apath = ppath + (("attribute", a),)
            if is_constant and outputs:
                out_name = prefix + outputs[0]
                if aname == "value" and tensor_span:
                    self.tensor(tensor_span, "", apath + ("t",), "constant", out_name)
                elif aname == "sparse_value" and sparse_span:
                    self.sparse(sparse_span, out_name, "", apath + ("sparse_tensor",))
                elif aname in ("value_float", "value_floats", "value_int", "value_ints"):
                    self.attribute_constant(aspan, aname, out_name, apath)
                elif aname.startswith("value_string"):
                    self.scan.skipped.append(f"{out_name} (string constant)")
            for gspan, k in graphs:
                sub = f"{prefix}{label}/{aname}/" + (f"{k}/" if k is not None else "")
                step = "g" if k is None else ("graphs", k)
                self.graph(gspan, sub, apath + (step,))

    def attribute_constant(self, span, form: str, name: str, apath: tuple) -> None:
        handle, (start, end) = self.handle, span
        dtype = "float32" if form.startswith("value_float") else "int64"
        shape: tuple[int, ...] = ()
        if form.endswith("s"):
            count = 0
            for num, wire, v in iter_fields(self.buf, start, end):
                if num in (7, 8):
                    if wire == 2:
                        count += (v[1] - v[0]) // 4 if num == 7 else len(_packed_varints(self.buf, v))
                    else:
                        count += 1
            shape = (count,)

        def compute():
            import onnx
            from onnx import helper

            attr = onnx.AttributeProto.FromString(handle.pread(start, end - start, f"constant '{name}'"))
            return np.asarray(helper.get_attribute_value(attr), dtype=dtype).reshape(shape)

        self.add(OnnxTensor(name, "constant-attr", LazyTensor(dtype, shape, compute,
                                                                     what=self._what(name)), apath,
                            attr_form=form))

    def _header(self, span) -> dict:
        """The fields of a TensorProto that say what and where its data are."""
        buf = self.buf
        h = {"dims": [], "data_type": 0, "name": "", "raw": None, "external": {}, "location": 0,
             "typed": False}
        for num, wire, v in iter_fields(buf, *span):
            if num == 1:
                if wire == 2:
                    h["dims"] += _packed_varints(buf, v)
                elif wire == 0:
                    h["dims"].append(v)
                else:  # dims are varints: another wire type means a damaged file
                    self.fail(f"tensor dims stored with protobuf wire type {wire}")
            elif num == 2 and wire == 0:
                h["data_type"] = v
            elif num == 8 and wire == 2:
                h["name"] = _text(buf, v)
            elif num == 9 and wire == 2:
                h["raw"] = v
            elif num == 13 and wire == 2:
                key, value = self._string_entry(v)
                h["external"][key] = value
            elif num == 14 and wire == 0:
                h["location"] = v
            elif num in _TYPED_FIELDS:
                h["typed"] = True
        # dims are int64: negative values arrive as huge unsigned varints
        if any(d >= 2**62 for d in h["dims"]):
            self.fail(f"tensor '{h['name']}' has a negative dimension")
        return h

    def tensor_ref(self, span, name: str, h: dict | None = None) -> tuple[TensorRef | None, dict]:
        h = h or self._header(span)
        code = h["data_type"]
        if code not in ONNX_DTYPES:
            what = ONNX_TYPE_NAMES.get(code, f"data type {code}")
            self.scan.skipped.append(f"{name} ({what})")
            return None, h
        dtype = _dt.get(ONNX_DTYPES[code])
        shape = tuple(h["dims"])
        nbytes = math.prod(shape) * dtype.itemsize
        if h["location"] == 1:
            return self.external_ref(name, dtype, shape, nbytes, h["external"]), h
        if h["raw"] is not None and not h["typed"] and dtype.name not in PACKED_4BIT:
            start, end = h["raw"]
            if end - start != nbytes:
                self.fail(f"tensor '{name}' {dtype.name}{list(shape)} needs {nbytes} bytes, "
                          f"raw_data holds {end - start}")
            return StoredTensor(dtype, shape, FileSource(self.handle, start, nbytes,
                                                         f"tensor '{name}'")), h
        if h["raw"] is None and not h["typed"] and nbytes:
            self.fail(f"tensor '{name}' {dtype.name}{list(shape)} has no data")
        return self.decoded_ref(span, name, dtype, shape), h

    def decoded_ref(self, span, name: str, dtype: _dt.DType, shape) -> TensorRef:
        """Typed fields or packed 4-bit data: onnx decodes them when asked."""
        handle, (start, end) = self.handle, span
        npdt = _dt.numpy_dtype(dtype)

        def compute():
            import onnx
            from onnx import numpy_helper

            raw = handle.pread(start, end - start, f"tensor '{name}'")
            try:
                arr = np.asarray(numpy_helper.to_array(onnx.TensorProto.FromString(raw)))
                if arr.dtype != npdt:
                    arr = arr.view(npdt) if arr.dtype.itemsize == npdt.itemsize else arr.astype(npdt)
                return arr.reshape(shape)
            except Exception as e:  # protobuf DecodeError, bad dims vs data: a damaged file
                raise FormatError(f"{handle.display}: tensor '{name}' cannot be decoded "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None

        return LazyTensor(dtype, shape, compute, what=self._what(name))

    def external_ref(self, name: str, dtype: _dt.DType, shape, nbytes: int, entries: dict) -> TensorRef:
        location = entries.get("location", "")
        if not location:
            self.fail(f"tensor '{name}' says its data is external but gives no location")
        target = (self.folder / location).resolve()
        if os.path.isabs(location) or self.folder not in target.parents:
            self.fail(f"tensor '{name}': external data '{location}' lies outside the model's "
                      f"folder; refusing to read it")
        numel = math.prod(shape)
        if dtype.name in PACKED_4BIT:
            nbytes = (numel + 1) // 2
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else nbytes
        except ValueError:
            self.fail(f"tensor '{name}': bad external data offset/length {entries}")
        if length != nbytes or offset < 0:
            self.fail(f"tensor '{name}' {dtype.name}{list(shape)} needs {nbytes} bytes, "
                      f"external data gives {length} at offset {offset}")
        handle = self.external_handles.get(location)
        if handle is None:
            if not target.is_file():
                self.fail(f"tensor '{name}': external data file '{location}' is missing")
            handle = self.external_handles[location] = FileHandle(target, location)
        source = FileSource(handle, offset, nbytes, f"tensor '{name}'")
        source.check()
        if dtype.name in PACKED_4BIT:
            return LazyTensor(dtype, shape, lambda: unpack_4bit(source.read(0, nbytes), numel,
                                                                dtype).reshape(shape),
                              what=self._what(name))
        return StoredTensor(dtype, shape, source)

    def tensor(self, span, prefix: str, ppath: tuple, kind: str, name: str | None = None) -> None:
        h = self._header(span)
        name = name if name is not None else prefix + h["name"]
        ref, h = self.tensor_ref(span, name, h)
        if ref is None:
            return
        raw = h["raw"] if h["location"] != 1 and not h["typed"] and \
            ONNX_DTYPES[h["data_type"]] not in PACKED_4BIT else None
        self.add(OnnxTensor(name, kind, ref, ppath, raw, h["location"] == 1))

    def sparse(self, span, name: str | None, prefix: str, ppath: tuple) -> None:
        values = indices = None
        dims: list[int] = []
        for num, wire, v in iter_fields(self.buf, *span):
            if num == 1 and wire == 2:
                values = v
            elif num == 2 and wire == 2:
                indices = v
            elif num == 3:
                dims += _packed_varints(self.buf, v) if wire == 2 else [v]
        if values is None or indices is None:
            self.fail(f"sparse tensor {name or ''} without values or indices")
        vh = self._header(values)
        name = name if name is not None else prefix + vh["name"]
        vref, _ = self.tensor_ref(values, name + ":values", vh)
        iref, ih = self.tensor_ref(indices, name + ":indices")
        if vref is None or iref is None:
            return
        if any(d >= 2**62 for d in dims):
            self.fail(f"sparse tensor '{name}' has a negative dimension")
        shape = tuple(dims)
        total = math.prod(shape)

        def densify():
            vals = vref.numpy().reshape(-1)
            idx = iref.numpy().astype(np.int64)
            out = np.zeros(total, dtype=vals.dtype)
            if idx.ndim == 2:       # [NNZ, rank] coordinates
                flat = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
            else:                   # [NNZ] linear indices
                flat = idx.reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= total):
                raise FormatError(f"{self.handle.display}: sparse tensor '{name}' has an index "
                                  f"outside its shape {list(shape)}")
            out[flat] = vals
            return out.reshape(shape)

        self.add(OnnxTensor(name, "sparse", LazyTensor(vref.dtype, shape, densify, (vref, iref),
                                                              what=self._what(name)), ppath,
                            external=vh["location"] == 1 or ih["location"] == 1))

    def add(self, t: OnnxTensor) -> None:
        if t.name in self.names:
            self.scan.skipped.append(f"{t.name} (a second tensor of that name)")
            return
        self.names.add(t.name)
        self.scan.tensors.append(t)
        self.counts[{"initializer": "initializers", "sparse": "sparse"}.get(t.kind, "constants")] += 1
        if any(step == "g" or isinstance(step, tuple) and step[0] == "graphs" for step in t.proto_path):
            self.counts["in_subgraphs"] += 1


def scan_onnx(path: Path) -> OnnxScan:
    """Parse a .onnx file's structure (no tensor bytes read)."""
    handle = FileHandle(path)
    if handle.size == 0:
        raise FormatError(f"{handle.display}: file is empty")
    if handle.is_remote:
        from ckptconv.remote import RemoteBuffer

        buf = RemoteBuffer(handle)
    else:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        try:
            return _Scanner(path, handle, buf).model()
        except DecodeError as e:
            raise FormatError(f"{handle.display}: not a valid ONNX protobuf ({e}; truncated?)") from None
    finally:
        buf.close()


def unpack_4bit(raw, numel: int, dtype: _dt.DType) -> np.ndarray:
    """ONNX INT4/UINT4: two elements a byte, the first in the low nibble."""
    b = np.frombuffer(raw, dtype=np.uint8)
    vals = np.empty(b.size * 2, dtype=np.uint8)
    vals[0::2], vals[1::2] = b & 0x0F, b >> 4
    vals = vals[:numel]
    if dtype.name == "int4":
        return ((vals.astype(np.int8) ^ 8) - 8).astype(_dt.numpy_dtype(dtype))
    return vals.astype(_dt.numpy_dtype(dtype))

