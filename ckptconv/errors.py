"""One exception hierarchy for ckptconv; the CLI maps it to exit codes.

Messages name the file, the place and the fix, on one line:
``model.pt: tensor 'fc.weight' needs 4.0 MB at offset 812, file ends at 512``.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_UNSAFE = 3


def one_line(text: str) -> str:
    """Messages are one line: control characters that come from file contents
    (a zip member or pickle name with a newline in it) are shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_line(e: BaseException, internal: bool = False) -> str:
    """``ckptconv: error: <one line>``: how every error reaches stderr.
    ``internal`` (an exception ckptconv did not raise on purpose) adds the
    exception's type, so that a bug report says what went wrong."""
    msg = one_line(" ".join(str(e).split())) or type(e).__name__
    if internal:
        msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
    return f"ckptconv: error: {msg}"


class CkptconvError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (one_line(args[0]),) + args[1:]
        super().__init__(*args)


class FormatError(CkptconvError):
    """The input is not what its format says it is (corrupt, truncated, unknown)."""


class IntegrityError(CkptconvError):
    """A checksum, CRC, size or offset does not agree with the data."""


class UnsafePickleError(CkptconvError):
    """A pickle asked for a callable outside the allowlist; nothing was executed."""

    exit_code = EXIT_UNSAFE


class MissingDependencyError(CkptconvError):
    """An optional extra is needed for this format."""


class MappingError(CkptconvError):
    """A mapping rule file is malformed or does not fit the checkpoint."""


class UsageError(CkptconvError):
    """Bad arguments: unknown format, existing output without --force, ..."""

    exit_code = EXIT_USAGE


class UnsupportedError(CkptconvError):
    """The target format cannot hold something the checkpoint has."""
