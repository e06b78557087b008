"""Atomic writes to object storage: staged locally, published together at the end.

Writers write local temp files (``atomic.atomic_file``); ``uploads`` streams
them up when the writer is done. On S3, GCS and Azure each is a multipart
upload, completed only after every target's parts are up and aborted on any
error or signal, so a failed conversion leaves no object at the destination;
other backends upload to a hidden temp name and move it into place. Ground
truth: fsspec ``spec.py`` (AbstractBufferedFile, ``autocommit=False``), s3fs
``core.py`` (S3File.commit/discard).
"""
from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Iterator

from .remote import FETCH_STEP, MULTIPART_PROTOCOLS, RemotePath, count_transfer

PART_SIZE = 16 << 20     # multipart upload part size (S3 allows 10,000 parts)


def _part_size() -> int:
    return max(5 << 20, int(os.environ.get("CKPTCONV_PART_SIZE") or PART_SIZE))  # S3's minimum


def _remote_file_writer(fs, fs_path: str, size: int):
    part = max(_part_size(), -(-size // 9000))
    return fs.open(fs_path, "wb", block_size=part, autocommit=False)


def _copy_into(f, local: str) -> int:
    done = 0
    with open(local, "rb") as src:
        while True:
            chunk = src.read(FETCH_STEP)
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
    return done


@contextlib.contextmanager
def uploads(targets: list[RemotePath]) -> Iterator[list[str]]:
    """Local staging files for ``targets``; after the block they are uploaded
    and made visible together at the end (multipart uploads completed last),
    or, on any error or signal, aborted and removed: nothing appears."""
    import shutil
    import tempfile

    staging = tempfile.mkdtemp(prefix="ckptconv-upload-", dir=os.environ.get("CKPTCONV_TMPDIR"))
    locals_ = [os.path.join(staging, f"{i}-{t.name or 'object'}") for i, t in enumerate(targets)]
    try:
        for p in locals_:
            open(p, "wb").close()
        yield locals_
        publish_uploads(targets, locals_)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_uploads(targets: list[RemotePath], locals_: list[str]) -> None:
    opened: list = []   # (target, file) with an upload in progress, not yet committed
    temps: list = []    # (target, temp path) for backends without multipart
    committed = False
    try:
        for t, local in zip(targets, locals_):
            size = os.path.getsize(local)
            fs = t.fs
            if t.protocol in MULTIPART_PROTOCOLS:
                f = _remote_file_writer(fs, t.fs_path, size)
                opened.append((t, f))
                _copy_into(f, local)
                f.close()  # uploads the last part; not visible until commit
            else:
                tmp = posixpath.join(posixpath.dirname(t.fs_path),
                                     f".{t.name}.{os.getpid()}.{os.urandom(4).hex()}.ckptconv-tmp")
                temps.append((t, tmp))
                fs.put_file(local, tmp)
            count_transfer(requests=max(1, -(-size // _part_size())), written=size)
        for t, f in opened:
            f.commit()
            count_transfer(requests=1)
        for t, tmp in temps:
            t.fs.mv(tmp, t.fs_path)
            count_transfer(requests=1)
        committed = True
        for t in targets:
            t.forget()
    finally:  # (an OSError goes up to atomic.py, which names the target in a WriteError)
        if not committed:
            for t, f in opened:
                with contextlib.suppress(Exception):
                    f.discard()  # aborts the multipart upload
            for t, tmp in temps:
                with contextlib.suppress(Exception):
                    t.fs.rm_file(tmp)
