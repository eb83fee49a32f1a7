"""Chat with a converted InternLM-XComposer-2.5 model (the seed's chat_demo flags).

    paddlevl convert internlm-xcomposer2d5-7b ixc25-pd
    python examples/ixc_chat_demo.py --model_name_or_path ixc25-pd --image_path dubai.png \\
        --text "Analyze the given image in a detail manner"

Several --image_path values send several pictures (use `<ImageHere>` in --text to place them; without markers
one picture goes in front of the prompt). Without --text, questions are read from the terminal and the
conversation continues (history and pictures are sent again every turn, as in the model card's multi-turn
example). Decoding is greedy unless --do_sample; the repetition penalty defaults to upstream chat()'s 1.005.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", required=True, help="folder written by `paddlevl convert`")
    p.add_argument("--image_path", nargs="*", default=[], help="picture(s) for the first question")
    p.add_argument("--text", default=None, help="the question (omit for an interactive chat)")
    p.add_argument("--hd_num", type=int, default=24, help="max 560x560 tiles per picture (6 with several)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--do_sample", action="store_true", help="sample (top_p 0.8) instead of greedy decoding")
    p.add_argument("--repetition_penalty", type=float, default=1.005)
    p.add_argument("--use_meta", action="store_true", help="add the IXC system prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--tokenizer_path", default=None,
                   help="folder with tokenizer.model when the model folder has none")
    p.add_argument("--vocab_map", default=None, help=argparse.SUPPRESS)  # tiny test checkpoints: tiny_vocab.json
    return p


def load_tokenizer(args):
    from paddlevl.models.internlm_xc2d5.tokenizer import InternLM2Tokenizer, MappedVocabTokenizer

    tok = InternLM2Tokenizer.from_dir(args.tokenizer_path or args.model_name_or_path)
    return MappedVocabTokenizer.from_json(tok, args.vocab_map) if args.vocab_map else tok


def run(args, lines=None, out=sys.stdout) -> list:
    """Returns the responses. `lines` replaces the terminal for scripted runs."""
    from paddlevl.checkpoint import load_model
    from paddlevl.models.internlm_xc2d5.chat import IXCChatSession

    tokenizer = load_tokenizer(args)
    model = load_model(args.model_name_or_path, dtype=args.dtype)
    session = IXCChatSession(model, tokenizer, hd_num=args.hd_num, use_meta=args.use_meta,
                             generation=dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                             repetition_penalty=args.repetition_penalty, seed=args.seed))
    images = list(args.image_path)
    if args.text is not None:
        questions = iter([args.text])
    elif lines is not None:
        questions = iter(lines)
    else:
        print("InternLM-XComposer-2.5 chat — empty line quits", file=out)
        questions = None
    responses = []
    while True:
        try:
            q = next(questions) if questions is not None else input("user> ")
        except (EOFError, StopIteration):
            break
        if not q.strip():
            break
        shown = [""]

        def show(text):
            print(text[len(shown[0]):], end="", flush=True, file=out)
            shown[0] = text

        print("assistant> ", end="", file=out)
        res = session.ask(q, images=images or None, stream=show)
        if res["result"] != shown[0]:
            print(res["result"][len(shown[0]):], end="", file=out)
        print(file=out)
        images = []
        responses.append(res["result"])
    return responses


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
