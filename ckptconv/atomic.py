"""Atomic output: write to a temp file in the target folder, fsync, rename,
fsync the folder. A crash or a full disk never leaves a half-written target,
and an existing target is only replaced with ``force``.

Temp files are named ``.NAME.PID.XXXXXXXX.ckptconv-tmp`` (NAME the target's
name, PID the writer's process id). A writer that is killed outright
(SIGKILL, power loss) cannot remove its temp file, but the target itself is
untouched; the next write to the same target removes such leftovers whose
writer process no longer exists. Caught signals (Ctrl-C, SIGTERM: the CLI
turns it into an exit) run the clean-up below and leave nothing behind.
Limits: several targets (shards + index) are renamed one after another, so a
crash between renames can leave some new and some old.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CkptconvError, UsageError
from .paths import as_path, is_remote


class WriteError(CkptconvError):
    """The output could not be written (disk full, file-size limit, permissions)."""


def check_target(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path}: already exists; pass --force to replace it")


TMP_SUFFIX = ".ckptconv-tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove ``.NAME.PID.*.ckptconv-tmp`` leftovers of ``path`` whose writer is gone."""
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for c in candidates:
        n = c.name
        if not (n.startswith(prefix) and n.endswith(TMP_SUFFIX)):
            continue
        pid, _, rest = n[len(prefix):].partition(".")
        if not pid.isdigit() or rest.startswith("old.") or _pid_alive(int(pid)):
            continue
        try:
            if c.is_dir() and not c.is_symlink():
                shutil.rmtree(c)
            else:
                c.unlink()
            removed.append(c)
        except OSError:
            pass
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read it without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path, folder: bool = False) -> int:
    """mkstemp/mkdtemp make 0600/0700 temps; the output gets the mode a plain
    ``open()``/``mkdir()`` would give it, or keeps the mode of what it replaces."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return (0o777 if folder else 0o666) & ~_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"{path}: no space left on device; nothing was written"
    if e.errno == errno.EFBIG:
        return f"{path}: file too large for this file system or limit; nothing was written"
    return f"{path}: cannot write: {e.strerror or e}"


def _new_temp(path: Path) -> Path:
    """An empty temp file beside ``path`` (same file system, so rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, _final_mode(path))
    finally:
        os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _remote_outputs(targets: list, force: bool) -> Iterator[list[Path]]:
    """Local staging files for object-storage targets, uploaded at the end as
    multipart uploads completed last and aborted on error (uploads.uploads)."""
    from .uploads import uploads

    for t in targets:
        check_target(t, force)
    try:
        with uploads(targets) as staged:
            yield [Path(s) for s in staged]
    except OSError as e:
        raise WriteError(_describe(e, targets[0])) from e


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``.
    An object-storage URL gets a local temp file, uploaded on success."""
    if is_remote(path):
        with _remote_outputs([as_path(path)], force) as (tmp,):
            yield tmp
        return
    path = Path(path)
    check_target(path, force)
    tmp = _new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(_describe(e, path)) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _remote_dir(target, force: bool) -> Iterator[Path]:
    """A folder output under an object-storage prefix: written to a local
    staging folder, then every file uploaded (multipart, committed only when
    all are up; aborted on error). ``.metadata`` is committed last, so a
    reader never finds a folder whose index names data not yet there. With
    ``force``, objects of the previous folder that the new one does not have
    are removed after the commit."""
    from .uploads import publish_uploads

    check_target(target, force)
    old = {p.fs_path for p in target.rglob("*")} if target.exists() else set()
    staging = Path(tempfile.mkdtemp(prefix="ckptconv-dir-", dir=os.environ.get("CKPTCONV_TMPDIR")))
    try:
        yield staging
        files = sorted((p for p in staging.rglob("*") if p.is_file()),
                       key=lambda p: (p.name == ".metadata", p.as_posix()))
        targets = [target.joinpath(*p.relative_to(staging).parts) for p in files]
        publish_uploads(targets, [str(p) for p in files])
        for stale in sorted(old - {t.fs_path for t in targets}):
            target.fs.rm_file(stale)
    except OSError as e:
        raise WriteError(_describe(e, target)) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Like ``atomic_file`` for outputs that are folders (a DCP checkpoint):
    files written into the yielded temp folder appear at ``path`` together
    (under a URL: uploaded when the writer is done, see ``_remote_dir``)."""
    if is_remote(path):
        with _remote_dir(as_path(path), force) as tmp:
            yield tmp
        return
    path = Path(path)
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent))
    os.chmod(tmp, _final_mode(path, folder=True))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                with open(os.path.join(root, f), "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            # the previous output, moved aside; stale clean-up never removes
            # these (after a crash between the two renames it is the only copy)
            old = path.with_name(f"{_temp_prefix(path)}old.{os.urandom(4).hex()}{TMP_SUFFIX}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(_describe(e, path)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(paths: list[Path], force: bool = False) -> Iterator[list[Path]]:
    """Several outputs (shards + index) that appear together or not at all."""
    if paths and is_remote(paths[0]):
        with _remote_outputs([as_path(p) for p in paths], force) as tmps:
            yield tmps
        return
    paths = [Path(p) for p in paths]
    for p in paths:
        check_target(p, force)
    with contextlib.ExitStack() as stack:
        tmps = []
        for p in paths:
            tmp = _new_temp(p)
            tmps.append(tmp)
            stack.callback(lambda t=tmp: t.unlink() if t.exists() else None)
        try:
            yield tmps
            for t in tmps:
                with open(t, "rb+") as f:
                    os.fsync(f.fileno())
            for t, p in zip(tmps, paths):
                os.replace(t, p)
            for folder in {p.parent for p in paths}:
                _fsync_dir(folder)
        except OSError as e:
            raise WriteError(_describe(e, paths[0])) from e
