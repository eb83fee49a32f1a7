"""python -m external_ops build [--verbose] | info"""
import argparse
import os
import sys

import external_ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m external_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the fused ops into the cache folder (no-op when already built)")
    b.add_argument("--verbose", action="store_true", help="show the compiler output instead of logging it")
    sub.add_parser("info", help="print the cache folder, whether the ops are built, and the current mode")
    args = parser.parse_args(argv)

    folder = external_ops.build_dir()
    if args.command == "info":
        state = "built" if (folder / "BUILD_OK").exists() else (
            "build failed (see build.log)" if (folder / "BUILD_FAILED").exists() else "not built")
        print(f"mode:   {external_ops.mode()} ({external_ops.ENV_MODE}={os.environ.get(external_ops.ENV_MODE, '')!r})")
        print(f"folder: {folder}")
        print(f"state:  {state}")
        return 0
    try:
        external_ops.ensure_built(build=True, verbose=args.verbose, retry=True)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"paddlevl fused ops ready: {external_ops._library(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
