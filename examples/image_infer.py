"""Ask a converted POINTS model (POINTS-1.5 or POINTS-Qwen-2.5) one question about one picture.

    paddlevl convert POINTS-1-5-Qwen-2-5-7B-Chat points15-pd
    python examples/image_infer.py --model_path points15-pd --image_file demo.jpg \\
        --question "please describe the image in detail" --max_new_tokens 1024 --temperature 0.0 --top_p 0.0

Temperature 0 (the model card's setting) decodes greedily; a positive temperature samples (with --top_p).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="folder written by `paddlevl convert`")
    p.add_argument("--image_file", required=True, help="the picture")
    p.add_argument("--question", default="please describe the image in detail")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 = sampling")
    p.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling mass when sampling (0 or 1 = off)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    return p


def generation_options(args) -> dict:
    sample = args.temperature > 0
    opts = {"max_new_tokens": args.max_new_tokens, "do_sample": sample, "temperature": args.temperature}
    if sample and 0 < args.top_p < 1:
        opts["top_p"] = args.top_p
    if args.seed is not None:
        opts["seed"] = args.seed
    return opts


def run(args) -> str:
    from paddlevl.checkpoint import load_model
    from paddlevl.models.registry import get, read_family_tag

    family = get(read_family_tag(args.model_path))
    if family.chat_session is None:
        raise SystemExit(f"family {family.name} has no chat support")
    session = family.chat_session(args.model_path, load_model(args.model_path, dtype=args.dtype))
    return session.ask(args.question, images=[args.image_file], **generation_options(args))["result"]


def main(argv=None) -> int:
    print(run(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
