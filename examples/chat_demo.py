"""Multi-turn chat in the terminal with a converted model folder (any family with chat support).

    python examples/chat_demo.py --model ./qwen-vl-chat-pd --image demo.jpg
    user> 这是什么?
    user> 框出图中公交车的位置          # Qwen-VL: the grounding picture is saved to --output_dir

Commands: ':image PATH' attaches a picture to the next question, ':reset' starts over, empty line or Ctrl-D quits.
Qwen-VL answers stream token by token.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder written by `paddlevl convert`")
    p.add_argument("--image", action="append", default=[], help="picture for the first question (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output_dir", default="output", help="where grounding pictures are saved")
    return p


def open_session(folder: str, dtype: str):
    from paddlevl.checkpoint import load_model
    from paddlevl.models.registry import get, read_family_tag

    family = get(read_family_tag(folder))
    if family.chat_session is None:
        raise SystemExit(f"family {family.name} has no chat support yet")
    return family, family.chat_session(folder, load_model(folder, dtype=dtype))


def run(args, lines=None, out=sys.stdout) -> list:
    """Chat loop. `lines` (an iterable of inputs) replaces the terminal for scripted runs; returns the results."""
    import paddle

    paddle.seed(args.seed)
    random.seed(args.seed)  # grounding colours
    family, session = open_session(args.model, args.dtype)
    can_stream = "stream" in inspect.signature(session.ask).parameters
    images = list(args.image)
    results = []
    source = iter(lines) if lines is not None else None
    print(f"{family.name} chat — ':image PATH' adds a picture, ':reset' starts over, empty line quits", file=out)
    turn = 0
    while True:
        try:
            line = next(source) if source is not None else input("user> ")
        except (EOFError, StopIteration):
            break
        line = line.strip()
        if not line:
            break
        if line == ":reset":
            session.reset()
            continue
        if line.startswith(":image "):
            images.append(line[len(":image "):].strip())
            continue
        kw = {"max_new_tokens": args.max_new_tokens}
        if can_stream:
            shown = [""]

            def show(text):
                print(text[len(shown[0]):], end="", flush=True, file=out)
                shown[0] = text

            print("assistant> ", end="", file=out)
            res = session.ask(line, images=images or None, stream=show, **kw)
            print(file=out)
        else:
            res = session.ask(line, images=images or None, **kw)
            print("assistant>", res["result"], file=out)
        images = []
        turn += 1
        if res.get("image") is not None:
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, f"turn{turn}_boxes.jpg")
            res["image"].save(path)
            res["image_path"] = path
            print(f"(grounding picture saved: {path})", file=out)
        results.append(res)
    return results


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
