"""``verify`` for torch files: the CRC-32 of every zip member (torch zip and
TorchScript archives; torch writes them, stored) against the central
directory; legacy and plain-pickle files carry no checksums. A sharded
``pytorch_model.bin.index.json`` checks each of its shards.

Ground truth: PKWARE APPNOTE 4.4.7; ``caffe2/serialize/inline_container.cc``.
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.paths import open_source
from ckptconv.sharding import shard_files
from ckptconv.zipstream import check_member_crcs
from ckptconv.ziputil import is_zip


def verify_torch(path: Path, report) -> None:
    for f in shard_files(path):
        with open_source(f) as fh:  # local, or a URL (one small range request)
            head = fh.read(4)
        if is_zip(head):
            problems, members = check_member_crcs(f)
            report.problems.extend(problems)
            report.count("zip members (crc32)", members)
        else:
            report.notes.append(f"{f.name}: legacy/pickle torch files carry no checksums; "
                                "use convert --manifest for end-to-end checks")
