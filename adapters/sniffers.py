"""Content sniffers of the built-in formats: cheap functions on a file's first
bytes (and its path), importable without any adapter module.

The registry names one sniffer per format (``FormatInfo.sniff``, a dotted
path to a function here) so that detecting a source imports only this module
and, once a format claims the file, that format's adapter. Each sniffer takes
``(head, path)`` -- ``head`` is the first ``registry.HEAD_BYTES`` bytes (empty
for a folder) -- and returns True when the file is its format. The helpers
they need (the TF prefix finder, the HDF5 superblock search, the torch pickle
magic) live here too; the adapters import them from here.
"""
from __future__ import annotations

import codecs
import os
import pickletools
import re
import struct
from pathlib import Path

from ckptconv.errors import FormatError
from ckptconv.paths import as_path, is_remote, open_source, path_or_reader
from ckptconv.tensor import FileHandle

# ckptconv.ziputil and ._io are imported by the sniffers that need them, once
# the head says so: detecting a safetensors file (``load_state_dict``'s first
# call) then imports neither the zip reader nor the crc32c helpers.
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header (ckptconv.ziputil.is_zip)


def is_zip(head: bytes) -> bool:
    return head[:4] == ZIP_MAGIC

# --- torch (torch/serialization.py) ---------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_HEAD = b"\x80\x02\x8a\x0a"  # PROTO 2, LONG1 of 10 bytes: the magic number
TEXT_PICKLE_SNIFF = 1 << 20
PICKLE_OPCODES = frozenset(op.code for op in pickletools.opcodes)


def is_bare_pickle(head: bytes, path: Path | None = None) -> bool:
    """A plain pickle: PROTO 2..5 and a valid opcode next, or a protocol 0/1
    pickle that parses to its STOP, or names a dangerous global, within its
    first MiB (``ckptconv.pickle.starts_a_pickle``). Never a safetensors
    header (a length safetensors accepts, then '{'), whatever its first byte:
    that is the safetensors reader's, and telling it apart imports no pickle
    parser (``scan`` still judges a pickle at the start of any file)."""
    if head[8:9] == b"{" and _safetensors_length(head):
        return False   # what the safetensors reader takes (its header is never unpickled)
    binary = len(head) >= 3 and head[0] == 0x80
    if not binary and (not head or head[:1].decode("latin1") not in PICKLE_OPCODES
                       or path is None):
        return False
    from ckptconv.pickle import starts_a_pickle

    if binary:
        return starts_a_pickle(head)
    with open_source(path) as f:
        return starts_a_pickle(f.read(TEXT_PICKLE_SNIFF))


def sniff_torch(head: bytes, path: Path) -> bool:
    if path.is_dir():
        return False
    if head.startswith(LEGACY_HEAD):
        return True
    if path.name.endswith(".index.json") and b'"weight_map"' in head:
        return b".bin" in head and b".safetensors" not in head
    if is_zip(head):
        # torch writes "<root>/data.pkl" first: check the first local header
        name_length = int.from_bytes(head[26:28], "little")
        if 30 + name_length <= len(head) and head[30:30 + name_length].endswith(b"data.pkl"):
            return True
        from ckptconv.ziputil import read_members

        try:
            members = read_members(FileHandle(path))
        except FormatError:
            # a truncated torch zip still starts with "<root>/data.pkl"
            return b"/data.pkl" in head[:200] or head[30:38] == b"data.pkl"
        return any(n.endswith("data.pkl") for n in members) and not \
            any(n.endswith(KERAS_WEIGHTS_MEMBER) for n in members)
    return is_bare_pickle(head, path)


# --- safetensors (the safetensors README) ----------------------------------------

MAX_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB


def sniff_safetensors(head: bytes, path: Path) -> bool:
    if path.name.endswith(".index.json"):
        if b'"weight_map"' in head:
            return True
        if not path.is_file():
            return False
        with open_source(path) as f:  # a long "metadata" can push it past the head
            return b'"weight_map"' in f.read(1 << 20)
    return head[8:9] == b"{" and _safetensors_length(head)


def _safetensors_length(head: bytes) -> bool:
    """The first 8 bytes are a header length safetensors accepts."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER


# --- TensorFlow bundles (core/lib/io/format.h, core/util/tensor_bundle) ---------

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48                 # two BlockHandles padded to 40 bytes + 8-byte magic
# a bundle's data file name (compiled on first use, by re's own cache: not at import)
DATA_FILE = r"^(?P<prefix>.*)\.data-(?P<k>\d{5})-of-(?P<n>\d{5})$"


def has_table_magic(index: Path) -> bool:
    try:
        size = index.stat().st_size
        if size < FOOTER_SIZE:
            return False
        with open_source(index) as f:
            f.seek(size - 8)
            return struct.unpack("<Q", f.read(8))[0] == TABLE_MAGIC
    except OSError:
        return False


def has_data_files(prefix: str) -> bool:
    # os.path, not Path: a prefix may end in "/" (an empty basename, as
    # tf.train.Checkpoint.write("dir/") makes: dir/.index, dir/.data-*)
    folder, base = os.path.split(prefix)
    try:
        names = ([c.name for c in as_path(folder).iterdir()] if is_remote(prefix)
                 else os.listdir(folder or "."))
        return any(re.match(DATA_FILE, name) and name.startswith(base + ".data-") for name in names)
    except OSError:
        return False


def _state_file_prefix(folder: Path) -> str:
    """The newest checkpoint named by a ``checkpoint`` state file (text proto)."""
    state = folder / "checkpoint"
    try:
        text = state.read_text(errors="replace")
    except OSError as e:
        raise FormatError(f"{state}: cannot read: {e.strerror}") from None
    found: dict[str, list[str]] = {}
    for m in re.finditer(r'^\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.M):
        try:                            # C escapes, as protobuf's text format writes them
            raw = codecs.escape_decode(m.group(2).encode("utf-8", "surrogateescape"))[0]
        except ValueError:
            raw = m.group(2).encode("utf-8", "surrogateescape")
        found.setdefault(m.group(1), []).append(raw.decode("utf-8", "surrogateescape"))
    names = found.get("model_checkpoint_path") or found.get("all_model_checkpoint_paths", [])[-1:]
    if not names:
        raise FormatError(f"{folder.name}/checkpoint: no model_checkpoint_path in the state file")
    name = names[0]
    base = os.path.basename(name)
    # TF writes absolute paths; a copied or moved folder still means its own files
    candidates = [f"{folder}/{base}", name if os.path.isabs(name) else f"{folder}/{name}"]
    for c in candidates:
        if as_path(c + ".index").exists():
            return c
    raise FormatError(f"{folder.name}/checkpoint: points at '{name}' but '{base}.index' "
                      f"is not in {folder}")


def find_prefix(path: str | os.PathLike, strict: bool = True) -> str | None:
    """The bundle prefix for a prefix, a ``.index`` or ``.data-*`` file, a folder
    with a ``checkpoint`` state file, a folder holding ``.index`` itself (the
    prefix ``dir/``), a SavedModel folder, its ``variables/`` or its
    ``saved_model.pb``.

    ``strict=False`` (sniffing) returns None instead of raising.
    """
    p = as_path(path)
    s = str(path) if is_remote(path) else os.fspath(path)
    try:
        if p.is_dir():
            if (p / "checkpoint").is_file():
                return _state_file_prefix(p)
            for cand in (p / "variables" / "variables", p / "variables"):
                if as_path(str(cand) + ".index").is_file():
                    return str(cand)
            if (p / ".index").is_file():         # prefix "dir/": dir/.index + dir/.data-*
                return str(p) + "/"
            if strict:
                raise FormatError(f"{p}: folder has no 'checkpoint' state file, no "
                                  f"saved_model variables/, no variables.index and no .index")
            return None
        if p.name == "saved_model.pb" and p.is_file():
            return find_prefix(p.parent, strict)
        if s.endswith(".index") and p.is_file():
            return s[: -len(".index")]
        m = re.match(DATA_FILE, s)
        if m and p.is_file():
            return m.group("prefix")
        if as_path(s + ".index").is_file():
            return s
    except FormatError:
        if strict:
            raise
        return None
    if strict:
        raise FormatError(f"{p}: not a TensorFlow checkpoint (no {p.name}.index)")
    return None


def sniff_tf(head: bytes, path: Path) -> bool:
    prefix = find_prefix(path, strict=False)
    if prefix is None:
        return False
    index = as_path(prefix + ".index")
    return has_table_magic(index) or (index.is_file() and has_data_files(prefix))


# --- HDF5 and Keras (the HDF5 file format specification; keras saving_lib) -------

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
KERAS_WEIGHTS_MEMBER = "model.weights.h5"
SUPERBLOCK_SEARCH_LIMIT = 1 << 30


def superblock_offset(head: bytes, path: Path) -> int | None:
    """Offset of the HDF5 signature: 0, or 512, 1024, 2048, ... after a user block."""
    if head[:8] == HDF5_MAGIC:
        return 0
    if not path.is_file():
        return None
    size = path.stat().st_size
    off = 512
    with open_source(path) as f:
        while off + 8 <= min(size, SUPERBLOCK_SEARCH_LIMIT):
            if off + 8 <= len(head):
                signature = head[off:off + 8]
            else:
                f.seek(off)
                signature = f.read(8)
            if signature == HDF5_MAGIC:
                return off
            off *= 2
    return None


def sniff_hdf5(head: bytes, path: Path) -> bool:
    return path.is_file() and superblock_offset(head, path) is not None


def keras_list_attr(obj, name: str) -> list[str] | None:
    """``layer_names`` / ``weight_names``, joined back from Keras' chunks."""
    import numpy

    attrs = obj.attrs
    if name in attrs:
        parts = [attrs[name]]
    elif f"{name}0" in attrs:
        parts, k = [], 0
        while f"{name}{k}" in attrs:
            parts.append(attrs[f"{name}{k}"])
            k += 1
    else:
        return None
    out = []
    for p in parts:
        for n in numpy.asarray(p).reshape(-1).tolist():
            out.append(n.decode("utf-8") if isinstance(n, bytes) else str(n))
    return out


def keras_layout(f) -> str | None:
    """``keras2-weights``, ``keras2-model``, ``keras3`` or None for an h5py file."""
    import h5py

    if keras_list_attr(f, "layer_names") is not None:
        return "keras2-weights"
    mw = f.get("model_weights")
    if isinstance(mw, h5py.Group) and keras_list_attr(mw, "layer_names") is not None:
        return "keras2-model"
    if isinstance(f.get("vars"), h5py.Group) or isinstance(f.get("optimizer/vars"), h5py.Group):
        return "keras3"
    for top in ("layers", "_layer_checkpoint_dependencies"):
        g = f.get(top)
        if isinstance(g, h5py.Group) and any(isinstance(g.get(f"{k}/vars"), h5py.Group) for k in g):
            return "keras3"
    return None


def sniff_keras_h5(head: bytes, path: Path) -> bool:
    if not path.is_file():
        return False
    if is_zip(head):
        from ckptconv.ziputil import read_members

        try:
            return KERAS_WEIGHTS_MEMBER in read_members(FileHandle(path))
        except FormatError:
            return False
    if superblock_offset(head, path) is None:
        return False
    try:
        import h5py
    except ImportError:
        return False
    try:
        with path_or_reader(path) as src, h5py.File(src, "r") as f:
            return keras_layout(f) is not None
    except (OSError, ValueError, RuntimeError):
        return False


# --- ONNX (onnx/onnx.proto: ModelProto) ------------------------------------------

# ModelProto field number -> wire type
MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
NAME_FIELDS = (2, 3, 4)           # ModelProto producer_name, producer_version, domain
MAX_NAME_FIELD = 1024


def looks_like_onnx(head: bytes) -> bool:
    """ModelProto serializations start with ir_version (field 1) and only hold
    ModelProto fields with their proper wire types (checked as far as ``head``
    goes: a field running past it ends the check)."""
    from ._io import DecodeError, read_varint

    if len(head) < 4 or head[0] != 0x08:
        return False
    pos, seen = 0, 0
    try:
        while pos < len(head):
            key, pos = read_varint(head, pos, len(head))
            num, wire = key >> 3, key & 7
            if MODEL_FIELDS.get(num) != wire or (seen == 0) != (num == 1):
                return False
            value, pos = read_varint(head, pos, len(head))
            seen += 1
            if num == 1 and not 1 <= value <= 64:
                return False
            # producer_name/version and domain are short names; a TF SavedModel
            # (saved_model.pb: version 1, then field 2 = the whole MetaGraphDef)
            # otherwise looks like a ModelProto
            if num in NAME_FIELDS and value > MAX_NAME_FIELD:
                return False
            if wire == 2:
                pos += value
                if pos > len(head):     # runs past head (or past the file: read reports it)
                    return True
    except DecodeError:
        return seen >= 2    # a varint cut by the end of head
    return seen >= 2


def sniff_onnx(head: bytes, path: Path) -> bool:
    return path.is_file() and looks_like_onnx(head)


# --- NumPy (numpy/lib/format.py) ----------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"


def sniff_npy(head: bytes, path: Path) -> bool:
    return head.startswith(NPY_MAGIC)


def sniff_npz(head: bytes, path: Path) -> bool:
    """A zip whose first member is a ``.npy`` (np.savez writes nothing else)."""
    if not is_zip(head):
        return False
    name_length = int.from_bytes(head[26:28], "little")
    return 30 + name_length <= len(head) and head[30:30 + name_length].endswith(b".npy")


# --- training-framework folders ---------------------------------------------------

def sniff_dcp(head: bytes, path: Path) -> bool:
    """A torch.distributed.checkpoint folder: ``.metadata``, a pickle of DCP's dataclasses."""
    meta = path / ".metadata"
    if not (path.is_dir() and meta.is_file()):
        return False
    with open_source(meta) as f:  # local, or a URL (one small range request)
        start = f.read(256)
    return start[:1] == b"\x80" and b"torch.distributed.checkpoint" in start


def sniff_deepspeed(head: bytes, path: Path) -> bool:
    """A DeepSpeed ZeRO folder: ``latest`` naming a tag folder, or the tag
    folder itself, holding ``*_optim_states.pt`` and ``*model_states.pt``."""
    if not path.is_dir():
        return False
    folder = path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if tag and "/" not in tag and "\\" not in tag and (path / tag).is_dir():
            folder = path / tag
    return any(folder.glob("*_optim_states.pt")) and any(folder.glob("*model_states.pt"))


# --- SavedModel folders ---------------------------------------------------------

# The files of a SavedModel folder, found by name beside saved_model.pb as
# TensorFlow finds them: the format whose scan judges each (None: no format
# does; its bytes are still scanned) and what the file is
_SAVED_MODEL_FILES = {
    "saved_model.pb": ("tf", "TensorFlow SavedModel graph"),
    "keras_metadata.pb": ("keras-h5", "Keras SavedModel metadata"),
    "fingerprint.pb": (None, "TensorFlow SavedModel fingerprint (numbers only)"),
}


def saved_model_member(path) -> tuple[str | None, str] | None:
    """(judging format, description) for a file of a SavedModel folder, else None."""
    if path.name not in _SAVED_MODEL_FILES or not (path.parent / "saved_model.pb").is_file():
        return None
    return _SAVED_MODEL_FILES[path.name]
