"""Writing ONNX models: a weights-only model (a graph of initializers,
streamed: protobuf framing planned first, tensor bytes after), or new weights
into an existing graph (``template=``), with external data when the model
would pass 2 GB or on request.

Sources of truth: ``onnx/onnx.proto``, ``onnx/external_data_helper.py``.
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.atomic import atomic_file, atomic_files
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.streaming import OutFile
from ckptconv.tensor import FileHandle, TensorRef
from ckptconv.tree import Checkpoint, iter_tensors, tree_to_metadata

from .read import ONNX_CODES, PACKED_4BIT, OnnxScan, OnnxTensor, len_field, scan_onnx

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_MARGIN = 64 << 20        # headroom for the graph itself below the 2 GB limit
EXTERNAL_MIN_BYTES = 1024         # smaller tensors stay inline (as onnx's size_threshold)
EXTERNAL_ALIGN_FROM = 64 << 10    # bigger tensors start on a 4 KB boundary (mmap friendly)


def onnx_code(ref: TensorRef, name: str) -> int:
    code = ONNX_CODES.get(ref.dtype.name)
    if code is None:
        raise UnsupportedError(f"ONNX has no data type for {ref.dtype.name} (tensor '{name}')")
    return code


def _tensor_message_head(name: str, ref: TensorRef) -> bytes:
    """A TensorProto without its data (name, dims, data_type)."""
    import onnx

    return onnx.TensorProto(name=name, dims=list(ref.shape), data_type=onnx_code(ref, name)
                            ).SerializeToString()


def _packed_tensor(name: str, ref: TensorRef) -> bytes:
    """int4/uint4: onnx packs two per byte; these are small, so built in memory."""
    from onnx import numpy_helper

    return numpy_helper.from_array(ref.numpy(), name).SerializeToString()


def _ir_version(refs) -> int:
    names = {r.dtype.name for r in refs}
    if "float8_e8m0fnu" in names:
        return 11
    if names & set(PACKED_4BIT):
        return 10
    if any(n.startswith("float8") for n in names):
        return 9
    return 8


def _model_head(ir_version: int, metadata: dict[str, str], producer: str = "ckptconv") -> bytes:
    import onnx

    m = onnx.ModelProto(ir_version=ir_version, producer_name=producer)
    m.opset_import.add(domain="", version=17 if ir_version <= 8 else 21)
    for k, v in metadata.items():
        m.metadata_props.add(key=str(k), value=str(v))
    return m.SerializeToString()


def _set_raw(tp, data: bytes) -> None:
    import onnx

    for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        tp.ClearField(f)
    del tp.external_data[:]
    tp.data_location = onnx.TensorProto.DEFAULT
    tp.raw_data = data


def _set_external(tp, location: str, offset: int, length: int) -> None:
    import onnx

    _set_raw(tp, b"")
    tp.ClearField("raw_data")
    tp.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tp.external_data.add(key=k, value=v)


class _DataFile:
    """The external data file: tensors appended, aligned, offsets handed back."""

    def __init__(self, out: OutFile, location: str):
        self.out, self.location = out, location
        self.placed: dict[int, tuple[int, int]] = {}  # id(ref) -> (offset, length)

    def append(self, ref: TensorRef) -> tuple[int, int]:
        if id(ref) in self.placed:  # a tied tensor: both initializers name one range
            return self.placed[id(ref)]
        if ref.nbytes >= EXTERNAL_ALIGN_FROM:
            self.out.pad_to(4096)
        offset = self.out.pos
        self.out.write_tensor(ref)
        if self.out.pos - offset != ref.nbytes:
            raise FormatError(f"{self.location}: wrote {self.out.pos - offset} bytes of a "
                              f"{ref.nbytes}-byte tensor")
        self.placed[id(ref)] = (offset, ref.nbytes)
        return offset, ref.nbytes


def _goes_external(ref: TensorRef) -> bool:
    return ref.nbytes >= EXTERNAL_MIN_BYTES and ref.dtype.name not in PACKED_4BIT


def _locate(model, steps: tuple):
    obj = model
    for step in steps:
        obj = getattr(obj, step) if isinstance(step, str) else getattr(obj, step[0])[step[1]]
    return obj


def write_onnx(ckpt: Checkpoint, path: Path, force: bool = False, template=None,
               external_data: bool = False, dedupe_tied: bool = False) -> dict:
    if template:
        return write_into_template(ckpt, path, Path(template), force, external_data)
    entries = []
    first: dict[int, str] = {}
    for name, ref in iter_tensors(ckpt.tree):
        tied = first.setdefault(id(ref), name) != name
        if dedupe_tied and tied:
            continue
        onnx_code(ref, name)
        entries.append((name, ref))
    meta = {str(k): str(v) for k, v in ckpt.metadata.items()}
    meta.update(tree_to_metadata(ckpt, first))
    notes = ["weights-only ONNX model: a graph of initializers (each also a graph output), "
             "no nodes"]
    if not ckpt.is_flat:
        notes.append("non-tensor entries kept in metadata_props['ckptconv.tree']")
    total = sum(r.nbytes for _, r in entries)
    if external_data or total + EXTERNAL_MARGIN > PROTOBUF_LIMIT:
        files = _write_weights_external(entries, meta, path, force)
        notes.append(f"tensors from {EXTERNAL_MIN_BYTES} bytes up in {Path(files[1]).name}")
    else:
        with atomic_file(path, force) as tmp:
            _write_weights_inline(entries, meta, tmp)
        files = [str(path)]
    return {"files": files, "notes": notes}


# weights-only, one file: the framing is planned, then bytes are streamed
def _write_weights_inline(entries, meta: dict[str, str], target: Path) -> None:
    parts = []          # per tensor: (prefix bytes, ref or None)
    graph_len = 0
    for name, ref in entries:
        if ref.dtype.name in PACKED_4BIT:
            body = _packed_tensor(name, ref)
            parts.append((len_field(5, len(body)) + body, None))
            graph_len += len(parts[-1][0])
            continue
        head = _tensor_message_head(name, ref) + len_field(9, ref.nbytes)
        msg_len = len(head) + ref.nbytes
        prefix = len_field(5, msg_len) + head
        parts.append((prefix, ref))
        graph_len += len(prefix) + ref.nbytes
    gname = _weights_graph(entries).SerializeToString()    # name and outputs
    graph_len += len(gname)
    model = _model_head(_ir_version([r for _, r in entries]), meta) + len_field(7, graph_len)
    if len(model) + graph_len > PROTOBUF_LIMIT:
        raise UnsupportedError(f"{target.name}: model would pass 2 GB; use external_data")
    with OutFile(target) as out:
        out.write(model)
        out.write(gname)
        for prefix, ref in parts:
            out.write(prefix)
            if ref is not None:
                start = out.pos
                out.write_tensor(ref)
                if out.pos - start != ref.nbytes:
                    raise FormatError(f"{target}: wrote {out.pos - start} bytes of a "
                                      f"{ref.nbytes}-byte tensor")
        expected = len(model) + graph_len
        if out.pos != expected:
            raise FormatError(f"{target}: wrote {out.pos} bytes, planned {expected}")


def _weights_graph(entries):
    """The graph of a weights-only model without its initializers: a name, and
    every initializer as a graph output (no nodes), so onnxruntime loads the
    model and returns the weights."""
    import onnx
    from onnx import helper

    return onnx.GraphProto(name="ckptconv_weights", output=[
        helper.make_tensor_value_info(name, onnx_code(ref, name), list(ref.shape))
        for name, ref in entries])


def _write_weights_external(entries, meta: dict[str, str], path: Path, force: bool) -> list[str]:
    import onnx

    data_path = path.with_name(path.name + ".data")
    model = onnx.ModelProto.FromString(_model_head(_ir_version([r for _, r in entries]), meta))
    model.graph.CopyFrom(_weights_graph(entries))
    with atomic_files([path, data_path], force) as (tmp_model, tmp_data):
        with OutFile(tmp_data) as out:
            data = _DataFile(out, data_path.name)
            for name, ref in entries:
                if ref.dtype.name in PACKED_4BIT:
                    model.graph.initializer.add().ParseFromString(_packed_tensor(name, ref))
                    continue
                tp = model.graph.initializer.add()
                tp.ParseFromString(_tensor_message_head(name, ref))
                if _goes_external(ref):
                    _set_external(tp, data_path.name, *data.append(ref))
                else:
                    tp.raw_data = ref.tobytes()
        tmp_model.write_bytes(model.SerializeToString())
    return [str(path), str(data_path)]


# --template: new weights into an exported graph
def write_into_template(ckpt: Checkpoint, path: Path, template: Path, force: bool,
                        external_data: bool) -> dict:
    if not template.is_file():
        raise FormatError(f"{template}: template model not found")
    if path.resolve() == template.resolve():
        raise FormatError(f"{path}: the output cannot replace its own template")
    scan = scan_onnx(template)
    provided = ckpt.tensors()
    replace: dict[str, TensorRef] = {}
    for t in scan.tensors:
        new = provided.get(t.name)
        if new is None:
            continue
        if tuple(new.shape) != tuple(t.ref.shape) or new.dtype != t.ref.dtype:
            raise FormatError(
                f"{template.name}: tensor '{t.name}' is {t.ref.dtype.name}{list(t.ref.shape)} "
                f"in the template but {new.dtype.name}{list(new.shape)} in the source")
        if t.kind == "sparse":
            raise UnsupportedError(f"{template.name}: '{t.name}' is a sparse tensor in the "
                                   "template; replacing sparse tensors is not supported")
        replace[t.name] = new
    notes = [f"replaced {len(replace)} of {len(scan.tensors)} template tensors"]
    kept = [t.name for t in scan.tensors if t.name not in replace]
    unused = [n for n in provided if n not in replace]
    if kept:
        notes.append(f"{len(kept)} template tensors not in the source, kept: " + _listing(kept))
    if unused:
        notes.append(f"{len(unused)} source tensors not in the template, not written: "
                     + _listing(unused))
    if any(t.kind == "sparse" and t.external for t in scan.tensors):
        raise UnsupportedError(f"{template.name}: sparse tensors with external data in a "
                               "template are not supported")
    size = template.stat().st_size + sum(t.ref.nbytes for t in scan.tensors if t.external)
    external = external_data or size + EXTERNAL_MARGIN > PROTOBUF_LIMIT
    inline_patch = not external and not any(t.external for t in scan.tensors) and all(
        t.raw_span is not None for t in scan.tensors if t.name in replace)
    if inline_patch:
        _patch_template(template, scan, replace, path, force)
        files = [str(path)]
    else:
        files = _rebuild_template(template, scan, replace, path, force, external)
        if external:
            notes.append(f"tensors from {EXTERNAL_MIN_BYTES} bytes up in {Path(files[1]).name}")
    return {"files": files, "notes": notes}

def _patch_template(template: Path, scan: OnnxScan, replace: dict, path: Path, force: bool) -> None:
    """Same-length raw_data swaps: template bytes around, new bytes inside."""
    handle = FileHandle(template)
    spans = sorted((t.raw_span, replace[t.name]) for t in scan.tensors if t.name in replace)
    with atomic_file(path, force) as tmp, OutFile(tmp) as out:
        pos = 0
        for (start, end), ref in spans:
            out.copy_from(handle, pos, start - pos)
            out.write_tensor(ref)
            pos = end
        out.copy_from(handle, pos, handle.size - pos)
        if out.pos != handle.size:
            raise FormatError(f"{path}: wrote {out.pos} bytes, the template has {handle.size}")

def _rebuild_template(template: Path, scan: OnnxScan, replace: dict, path: Path, force: bool,
                      external: bool) -> list[str]:
    import onnx

    try:
        model = onnx.load(str(template), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FormatError(f"{template.name}: onnx cannot parse it ({e})") from None

    def assign_attr(t: OnnxTensor, ref: TensorRef) -> None:
        attr = _locate(model, t.proto_path)
        arr = ref.numpy()
        if t.attr_form == "value_float":
            attr.f = float(arr)
        elif t.attr_form == "value_int":
            attr.i = int(arr)
        elif t.attr_form == "value_floats":
            del attr.floats[:]
            attr.floats.extend(arr.reshape(-1).tolist())
        else:
            del attr.ints[:]
            attr.ints.extend(arr.reshape(-1).tolist())

    if not external:
        for t in scan.tensors:
            ref = replace.get(t.name)
            if t.kind == "sparse" or (ref is None and not t.external):
                continue
            ref = ref if ref is not None else t.ref
            if t.attr_form:
                assign_attr(t, ref)
            elif ref.dtype.name in PACKED_4BIT:
                _set_packed(_locate(model, t.proto_path), ref)
            else:
                _set_raw(_locate(model, t.proto_path), ref.tobytes())
        with atomic_file(path, force) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return [str(path)]
    data_path = path.with_name(path.name + ".data")
    with atomic_files([path, data_path], force) as (tmp_model, tmp_data):
        with OutFile(tmp_data) as out:
            data = _DataFile(out, data_path.name)
            for t in scan.tensors:
                if t.kind == "sparse":
                    continue
                ref = replace.get(t.name, t.ref)
                if t.attr_form:
                    if t.name in replace:
                        assign_attr(t, ref)
                    continue
                tp = _locate(model, t.proto_path)
                if ref.dtype.name in PACKED_4BIT:
                    if t.name in replace or t.external:
                        _set_packed(tp, ref)
                elif _goes_external(ref):
                    _set_external(tp, data_path.name, *data.append(ref))
                elif t.name in replace or t.external:
                    _set_raw(tp, ref.tobytes())
        tmp_model.write_bytes(model.SerializeToString())
    return [str(path), str(data_path)]


def _set_packed(tp, ref: TensorRef) -> None:
    """Replace a TensorProto's content by ``ref`` packed two per byte (int4/uint4)."""
    import onnx

    new = onnx.TensorProto()
    new.ParseFromString(_packed_tensor(tp.name, ref))
    tp.CopyFrom(new)


def _listing(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
