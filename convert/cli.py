"""`paddlevl convert SRC DST ...` (also `python -m convert SRC DST ...`).

The lead's paddlevl/cli.py mounts this as a subcommand through ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .engine import DTYPE_CHOICES, check_dst, execute, format_plan, make_plan
from .readers import ConvertError
from .writers import FORMATS

DESCRIPTION = ("Convert an upstream torch checkpoint folder (safetensors or .bin, single or sharded) into a folder the "
               "Paddle model loads with paddlevl.checkpoint.load_model. Streams one tensor at a time.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", metavar="SRC", help="upstream checkpoint folder (config.json + weights)")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                        help="dtype of floating tensors in the output (default: keep the checkpoint's, bit-exact)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="pdparams", dest="format",
                        help="pdparams: PaddleNLP layout model_state-0000k-of-0000n.pdparams + index (default); "
                             "safetensors: model-0000k-of-0000n.safetensors + index")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (source -> target, shape, dtype, op or drop reason); write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--family", default=None, metavar="NAME",
                        help="model family (default: detected from config.json and the key names)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="convert a partial checkpoint (e.g. a benchmark slice): model parameters with no source "
                             "tensor are reported, not an error; everything else stays strict. The output will "
                             "not load.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _terminated(signum, frame):
    raise SystemExit(128 + signum)   # unwinds like Ctrl-C: the partial folder is removed on the way out


def run(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command; returns the exit code (0 ok, 1 conversion refused / failed)."""
    err = lambda m: print(m, file=sys.stderr)   # noqa: E731
    old = None
    try:
        if not args.dry_run:
            check_dst(args.src, args.dst, args.overwrite)   # fail before reading anything
        plan = make_plan(args.src, family=args.family, dtype=args.dtype, fmt=args.format,
                         max_shard_size=args.max_shard_size, allow_missing=getattr(args, "allow_missing", False))
        for note in plan.notes:
            err(f"note: {note}")
        if args.dry_run:
            try:
                print(format_plan(plan))
            finally:
                plan.source.close()
            return 0
        if threading.current_thread() is threading.main_thread():
            # installed here, after planning imported paddle (whose own SIGTERM handler just kills the process)
            old = signal.signal(signal.SIGTERM, _terminated)
        execute(plan, args.dst, overwrite=args.overwrite, progress=not args.no_progress, log=err)
        return 0
    except ConvertError as e:
        err(f"paddlevl convert: error: {e}")
        return 1
    except KeyboardInterrupt:
        err("paddlevl convert: interrupted; nothing was written")
        return 130
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            err("paddlevl convert: terminated; nothing was written")
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="paddlevl convert", description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
