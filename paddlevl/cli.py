"""`paddlevl` command line: convert | parity | chat | demo."""
from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")


def _cmd_convert(args) -> int:
    from convert.cli import run
    return run(args)


def _cmd_parity(args) -> int:
    from .parity import main_golden
    if not args.golden:
        print("paddlevl parity: give --golden FIXTURE_DIR (a folder with manifest.json, source/, inputs.npz, "
              "expected.npz)", file=sys.stderr)
        return 2
    return main_golden(args.golden, args.rtol)


def _cmd_demo(args) -> int:
    from .parity import run_golden
    fixtures = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(args.fixtures, "*", "manifest.json")))
    if not fixtures:
        print(f"paddlevl demo: no fixtures under {args.fixtures}", file=sys.stderr)
        return 2
    failed = []
    for fx in fixtures:
        try:
            rows, _ = run_golden(fx, args.rtol)
        except NotImplementedError as e:
            print(f"{fx}: {e}\n")
            continue
        print()
        if not all(r.ok for r in rows):
            failed.append(fx)
    print("demo:", "all bundled fixtures match upstream" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


def _cmd_chat(args) -> int:
    from .appflow import Appflow
    task = Appflow(app="image2text_generation", models=[args.model], dtype=args.dtype)
    gen = {"max_new_tokens": args.max_new_tokens}
    images = list(args.image or [])
    print("paddlevl chat — empty line or Ctrl-D quits, ':reset' clears the conversation, ':image PATH' adds a picture")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == ":reset":
            task.reset()
            continue
        if line.startswith(":image "):
            images.append(line[len(":image "):].strip())
            continue
        out = task(image=images or None, prompt=line, **gen)
        images = []
        print("assistant>", out["result"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paddlevl", description=(
        "PaddlePaddle ports of Qwen-VL-Chat, POINTS-1.5, POINTS-Qwen-2.5 and InternLM-XComposer2.5: convert the "
        "released torch checkpoints, check parity, chat."))
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert an upstream torch checkpoint folder into a Paddle folder",
                       description="Convert a downloaded upstream (HF layout) checkpoint folder into Paddle weights. "
                                   "Streams one tensor at a time; works without a GPU.")
    from convert.cli import add_arguments
    add_arguments(c)
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("parity", help="compare our port with upstream outputs",
                       description="--golden FIXTURE_DIR: convert the fixture's source/, run our model on its "
                                   "inputs.npz and compare every array of expected.npz (exit 1 on any failure).")
    q.add_argument("--golden", metavar="FIXTURE_DIR", help="fixture folder (manifest.json, source/, inputs.npz, "
                                                           "expected.npz)")
    q.add_argument("--rtol", type=float, default=1e-4, help="max|diff| / max|ref| bound for float arrays "
                                                            "(default 1e-4)")
    q.set_defaults(func=_cmd_parity)

    d = sub.add_parser("demo", help="convert the bundled tiny checkpoints and print their parity figures")
    d.add_argument("--fixtures", default=BUNDLED_FIXTURES, help="folder of fixtures (default: the bundled ones)")
    d.add_argument("--rtol", type=float, default=1e-4)
    d.set_defaults(func=_cmd_demo)

    h = sub.add_parser("chat", help="chat in the terminal with a converted model folder")
    h.add_argument("model", help="a folder written by `paddlevl convert`")
    h.add_argument("--image", action="append", help="picture for the first turn (repeatable)")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    h.add_argument("--max-new-tokens", type=int, default=512)
    h.set_defaults(func=_cmd_chat)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
