"""Command-line interface: a thin layer over the Python API.

Errors are one line on stderr (``ckptconv: error: FILE: problem``) with the
contract's exit codes: 0 ok, 1 bad input or integrity failure, 2 usage,
3 unsafe content refused. ``--debug`` shows the traceback. Heavy libraries
(torch, tensorflow, h5py, onnx) are never imported at start-up.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from .errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, CkptconvError, error_line

PROG = "ckptconv"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the contract says
        self.print_usage(sys.stderr)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _byte_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (try 5GB or 500MB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: '{text}'")
    return value


# How the CLI takes each declared reader/writer option (argparse keywords); the
# flag comes from the option's name and the formats that take it from the
# registry's table, so an option added to a table row is a flag at once.
OPTION_ARGUMENTS: dict[str, dict[str, Any]] = {
    "shard_size": dict(type=_byte_size, metavar="SIZE", help="shard output (e.g. 5GB)"),
    "dedupe_tied": dict(action="store_true", help="store tied tensors once"),
    "template": dict(metavar="MODEL.onnx",
                     help="replace the weights of this exported graph by name"),
    "external_data": dict(action="store_true",
                          help="store tensors in a data file beside the model"),
    "torch_compat": dict(metavar="VERSION",
                         help="write what this torch version can load (1.13: floats become "
                              "0-d tensors), or fail"),
    "jobs": dict(type=int, metavar="N",
                 help="write shards in parallel; with --out-dir: N local processes"),
}
_OTHER_OPTION = dict(metavar="VALUE", help="an option")


def _writing(sp: argparse.ArgumentParser, with_hook: str | None = None) -> list[str]:
    """The writers' declared options as flags (of the formats with ``with_hook``
    if given), each help naming the formats that take it; returns the options."""
    from . import api

    declared = api.declared_flags("write", with_hook)
    order = list(OPTION_ARGUMENTS)
    for option in sorted(declared, key=lambda o: (o not in order, order.index(o) if o in order
                                                  else 0, o)):
        flag, formats = declared[option]
        spec = dict(OPTION_ARGUMENTS.get(option, _OTHER_OPTION))
        spec["help"] = f"{', '.join(formats)}: {spec['help']}"
        sp.add_argument(flag, dest=option, **spec)
    return list(declared)


def _reading(sp: argparse.ArgumentParser) -> None:
    """Options of every verb that reads checkpoints."""
    sp.add_argument("--allow-global", dest="allow_globals", action="append", metavar="MODULE.NAME",
                    help="one more inert record type for this run (repeatable)")
    _storage(sp)


def _storage(sp: argparse.ArgumentParser) -> None:
    """``--storage-option``: of every verb that takes URLs."""
    sp.add_argument("--storage-option", dest="storage_option", action="append",
                    metavar="KEY=VALUE", help="an fsspec backend option for URLs, e.g. "
                    "endpoint_url=http://host:9000 or anon=true (repeatable)")


def _many(sp: argparse.ArgumentParser, jobs: bool = True) -> None:
    """Options of the verbs that take many sources (paths, globs, folders)."""
    if jobs:
        sp.add_argument("--jobs", type=int, metavar="N", help="run the sources in N local processes")
    sp.add_argument("--scheduler", metavar="ADDRESS",
                    help="run the sources on this Dask cluster (default: $CKPTCONV_SCHEDULER)")


# --- one argument builder per verb: adds its arguments, and turns the parsed
# arguments into the API call (positional args, keyword args) ---------------------------

def _convert_arguments(c: argparse.ArgumentParser):
    c.add_argument("paths", nargs="+", metavar="PATH",
                   help="SRC DST; or sources (files, folders, globs, URLs) with --out-dir")
    c.add_argument("--out-dir", metavar="DIR|URL",
                   help="convert every source into DIR, keeping relative names (needs --to)")
    c.add_argument("--resume", action="store_true",
                   help="with --out-dir: skip sources whose output exists and verifies")
    c.add_argument("--to", metavar="FMT", help="target format (see `ckptconv formats`)")
    c.add_argument("--from", dest="from_", metavar="FMT", help="force the source format")
    c.add_argument("--map", action="append", metavar="RULES_FILE|PRESET",
                   help="key-rename rules (repeatable; applied in order)")
    c.add_argument("--strict", action="store_true",
                   help="unmatched mapping keys, and anything the target cannot hold, are errors")
    c.add_argument("--select", metavar="TREE.PATH", help="convert only this subtree")
    c.add_argument("--dtype", metavar="DTYPE", help="cast floating-point tensors (bf16, fp16, ...)")
    c.add_argument("--manifest", action="store_true", help="also write <DST>.sha256.json")
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    writer_options = _writing(c)
    if "jobs" not in writer_options:   # --out-dir runs the sources in N local processes
        c.add_argument("--jobs", type=int, metavar="N", help="with --out-dir: N local processes")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    _reading(c)
    _many(c, jobs=False)

    def call(a):
        if a.out_dir is None and len(a.paths) != 2:
            from .errors import UsageError

            raise UsageError("convert takes SRC DST, or sources and --out-dir DIR|URL")
        return list(a.paths), dict(
            to=a.to, format=a.from_, mapping=a.map, select=a.select, force=a.force,
            dtype=a.dtype, strict=a.strict, jobs=a.jobs, manifest=a.manifest,
            progress=_progress_enabled(a), allow_globals=a.allow_globals,
            **{o: getattr(a, o) for o in writer_options if o != "jobs"})
    return call


def _inspect_arguments(i: argparse.ArgumentParser):
    i.add_argument("src", nargs="+", help="a checkpoint; or several (files, folders, globs, URLs)")
    i.add_argument("--from", dest="from_", metavar="FMT", help="force the source format")
    i.add_argument("--all", action="store_true", help="list every tensor (default: first 50)")
    _reading(i)
    _many(i)
    return lambda a: (a.src, dict(format=a.from_, show_all=a.all, allow_globals=a.allow_globals))


def _diff_arguments(d: argparse.ArgumentParser):
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--map", action="append", metavar="RULES_FILE|PRESET",
                   help="rules applied to A before comparing")
    d.add_argument("--suggest", action="store_true", help="print DSL rules that map A onto B")
    only = d.add_mutually_exclusive_group()
    only.add_argument("--values-only", action="store_true",
                      help="only non-tensor values (epoch, hyper-parameters, constants) and metadata")
    only.add_argument("--tensors-only", action="store_true", help="only tensors")
    _reading(d)
    return lambda a: ([a.a, a.b], dict(mapping=a.map, suggest=a.suggest,
                                       tensors=not a.values_only, values=not a.tensors_only,
                                       allow_globals=a.allow_globals))


def _check_arguments(k: argparse.ArgumentParser):
    k.add_argument("src")
    _reading(k)
    return lambda a: ([a.src], dict(allow_globals=a.allow_globals))


def _sanitize_arguments(s: argparse.ArgumentParser):
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--force", action="store_true", help="replace DST if it exists")
    writer_options = _writing(s, with_hook="sanitize")
    _reading(s)
    return lambda a: ([a.src, a.dst], dict(force=a.force, allow_globals=a.allow_globals,
                                           **{o: getattr(a, o) for o in writer_options}))


def _verify_arguments(v: argparse.ArgumentParser):
    v.add_argument("src", nargs="+", help="a checkpoint; or several (files, folders, globs, URLs)")
    v.add_argument("--manifest", action="store_true", help="also check <SRC>.sha256.json")
    _reading(v)
    _many(v)
    return lambda a: (a.src, dict(manifest=a.manifest, allow_globals=a.allow_globals))


def _scan_arguments(sc: argparse.ArgumentParser):
    sc.add_argument("src", nargs="+")
    _reading(sc)
    _many(sc)
    return lambda a: ([a.src], dict(allow_globals=a.allow_globals))


def _formats_arguments(f: argparse.ArgumentParser):
    return lambda a: ([], {})


def _presets_arguments(pr: argparse.ArgumentParser):
    pr.add_argument("name", nargs="?")
    return lambda a: ([a.name], {})


def _ls_arguments(ls: argparse.ArgumentParser):
    ls.add_argument("paths", nargs="+", metavar="PATH", help="folders, files or globs")
    ls.add_argument("--sort", default="time", metavar="KEY",
                    help="time (default), path, size, epoch, step, loss or a metric")
    _storage(ls)
    return lambda a: ([a.paths], dict(sort=a.sort))


def _pick_arguments(pk: argparse.ArgumentParser):
    pk.add_argument("path", help="the run's folder (or a glob)")
    how = pk.add_mutually_exclusive_group(required=True)
    how.add_argument("--latest", action="store_true", help="the newest intact checkpoint")
    how.add_argument("--best", metavar="KEY", help="the lowest KEY (loss, val_loss, ...)")
    pk.add_argument("--max", action="store_true", help="with --best: the highest value wins")
    _storage(pk)
    return lambda a: ([a.path], dict(latest=a.latest, best=a.best, maximize=a.max))


def _prune_arguments(pn: argparse.ArgumentParser):
    pn.add_argument("path", help="the run's folder (or a glob)")
    pn.add_argument("--keep-last", type=int, required=True, metavar="N",
                    help="keep the N newest intact checkpoints")
    pn.add_argument("--keep-best", metavar="KEY", help="also keep the best by KEY (lowest)")
    pn.add_argument("--max", action="store_true", help="with --keep-best: the highest wins")
    pn.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    _storage(pn)
    return lambda a: ([a.path], dict(keep_last=a.keep_last, keep_best=a.keep_best,
                                     maximize=a.max, dry_run=a.dry_run))


# verb -> (name of the api function, argument builder, help); the CLI is this table.
VERBS: dict[str, tuple[str, Callable, str]] = {
    "convert": ("convert", _convert_arguments,
                "convert SRC to DST (format from --to or DST's extension)"),
    "inspect": ("inspect", _inspect_arguments,
                "show format, tensors, dtypes, shapes, bytes, tree and metadata"),
    "diff": ("diff", _diff_arguments, "compare two checkpoints: keys, shapes, dtypes, values"),
    "check": ("check", _check_arguments,
              "torch compatibility: minimum torch, weights_only blockers"),
    "sanitize": ("sanitize", _sanitize_arguments,
                 "rewrite as a torch file that loads with weights_only=True"),
    "verify": ("verify", _verify_arguments, "integrity: CRCs, offsets, sizes, checksums"),
    "scan": ("scan", _scan_arguments, "pickle safety report; never executes anything"),
    "formats": ("formats", _formats_arguments, "list formats"),
    "presets": ("presets", _presets_arguments, "list mapping presets, or print one"),
    "ls": ("ls", _ls_arguments, "list the checkpoints of a run: time, epoch, step, loss, status"),
    "pick": ("pick", _pick_arguments,
             "print the path of the newest intact checkpoint, or the best by a metric"),
    "prune": ("prune", _prune_arguments,
              "remove a run's checkpoints but the newest N (and the best)"),
}


def build_parser(verbs: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the arguments of ``verbs`` (default: all) are added, so
    that ``ckptconv --help`` and a verb's run build no other verb's flags (the
    writer flags come from the format table, through the API)."""
    p = _Parser(prog=PROG, description="Convert, inspect and check model checkpoints "
                "(PyTorch, safetensors, TensorFlow, HDF5/Keras, ONNX) without running their code.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name, (_, add_arguments, help_) in VERBS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        sp.add_argument("--json", action="store_true", help="print a JSON report")
        if verbs is None or name in verbs:
            sp.set_defaults(api_call=add_arguments(sp))
    return p


def _verb_of(argv: Sequence[str]) -> list[str]:
    """The verb named on the command line (the first word that is one), if any."""
    return [a for a in argv if a in VERBS][:1]


def _version() -> str:
    from . import __version__

    return __version__


def _emit(report: Any, as_json: bool) -> None:
    if as_json:
        data = report.to_dict() if hasattr(report, "to_dict") else report
        print(json.dumps(data, indent=2, default=str))
    elif hasattr(report, "print_table"):  # a table: rich on a terminal, plain columns otherwise
        report.print_table(sys.stdout)
    else:
        print(str(report))


def _progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def run(args: argparse.Namespace) -> int:
    """Call the verb's API function and print its report; the exit code is the report's."""
    from . import api

    positional, keywords = args.api_call(args)
    if getattr(args, "storage_option", None):
        keywords["storage_options"] = api.parse_storage_options(args.storage_option)
    if _is_batch(args, positional):
        return _run_batch(args, positional, keywords)
    if args.verb in ("inspect", "verify"):
        positional = positional[:1]
    report = getattr(api, VERBS[args.verb][0])(*positional, **keywords)
    _emit(report, args.json)
    return getattr(report, "exit_code", EXIT_OK)


def _is_batch(args: argparse.Namespace, positional: list) -> bool:
    """Many sources (or the flags that run them as tasks): one result per source."""
    if args.verb == "convert":
        return args.out_dir is not None
    if args.verb not in ("inspect", "verify", "scan"):
        return False
    if (args.jobs or 1) > 1 or args.scheduler:
        return True
    if args.verb == "scan":   # scan walks several paths itself, into one report
        return False
    from . import api

    return api.looks_like_many(positional)


def _run_batch(args: argparse.Namespace, positional: list, keywords: dict) -> int:
    """Print each source's result as it finishes (one JSON object a line with
    --json), then a summary line; exit 1 if any failed."""
    from . import api

    sources = positional[0] if args.verb == "scan" else positional
    options = dict(keywords)
    jobs = options.pop("jobs", None) if args.verb == "convert" else args.jobs
    progress = options.pop("progress", False) or _progress_enabled(args)

    def show(result):
        print(json.dumps(result.to_dict(), default=str) if args.json else str(result), flush=True)

    report = api.batch(args.verb, sources, out_dir=getattr(args, "out_dir", None), jobs=jobs,
                       scheduler=args.scheduler, resume=getattr(args, "resume", False),
                       progress=progress, on_result=show, **options)
    if not args.json:
        print(str(report))
    return report.exit_code


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that temp files are cleaned up."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _install_signal_handlers() -> dict:
    """A file-size limit (RLIMIT_FSIZE) makes a write fail with EFBIG instead of
    killing us with SIGXFSZ; SIGTERM unwinds like Ctrl-C, removing temp files.
    Returns the previous handlers (restored when ``main`` returns)."""
    import signal
    import threading

    old = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for name, handler in (("SIGXFSZ", signal.SIG_IGN), ("SIGTERM", _on_sigterm)):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    return old


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_verb_of(argv))
    args = parser.parse_args(argv)
    previous = _install_signal_handlers()
    try:
        return run(args)
    except _Terminated:
        print(f"{PROG}: terminated; nothing was left half-written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except CkptconvError as e:
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug or an input we did not foresee: still one line
        if args.debug:
            raise
        print(error_line(e, internal=True), file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
