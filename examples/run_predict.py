"""Qwen-VL single-image prediction with grounding (the PaddleMIX qwen_vl/run_predict.py flags).

    python examples/run_predict.py --model_name_or_path ./qwen-vl-chat-pd --input_image demo.jpg \
        --prompt "Generate the caption in English with grounding:" --dtype float32 --output_dir output

The model folder is one written by `paddlevl convert` (nothing is downloaded). A chat checkpoint (generation
config chat_format "chatml") is asked through the chat template; a base checkpoint gets the raw prompt. When the
response has <ref>/<box> grounding and --visual is true, the boxes are drawn on the picture and saved as
OUTPUT_DIR/pred.jpg.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", required=True, help="converted Qwen-VL folder (paddlevl convert)")
    p.add_argument("--input_image", default=None, help="image path (or URL, needs network)")
    p.add_argument("--prompt", default=None, help="text after the picture")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--visual", type=str2bool, default=True, help="save the grounding picture (true/false)")
    p.add_argument("--output_dir", default="output")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    return p


def predict(args, logits_processors=()) -> dict:
    """Run one prediction; `logits_processors` (programmatic use) are passed to the decode loop."""
    import paddle

    from paddlevl.checkpoint import load_model
    from paddlevl.grounding import draw_bbox_on_latest_picture
    from paddlevl.models.qwen_vl.chat import ChatConfig, chat, generate_ids
    from paddlevl.models.qwen_vl.chat_format import DEFAULT_SYSTEM
    from paddlevl.models.qwen_vl.tokenizer import QWenTokenizer

    if args.prompt is None and args.input_image is None:
        raise SystemExit("run_predict: give --prompt and/or --input_image")
    paddle.seed(args.seed)
    random.seed(args.seed)  # the grounding colours (upstream picks them with random.choice)
    folder = args.model_name_or_path
    tokenizer = QWenTokenizer.from_pretrained(folder)
    model = load_model(folder, dtype=args.dtype)
    model.eval()
    items = ([{"image": args.input_image}] if args.input_image else []) + (
        [{"text": args.prompt}] if args.prompt is not None else [])
    query = tokenizer.from_list_format(items)
    cc = ChatConfig.from_folder(folder)
    gen = {"seed": args.seed}
    if args.max_new_tokens:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        gen["do_sample"] = False
    if cc.chat_format == "chatml":
        response, history = chat(model, tokenizer, query, [], DEFAULT_SYSTEM, chat_config=cc,
                                 logits_processors=logits_processors, **gen)
    else:  # base model (Qwen-VL): the raw prompt, the generation config's own stop words, as model.generate does
        ids = tokenizer.encode(query)
        new = generate_ids(model, tokenizer, ids, cc.generation(tokenizer, **gen), list(cc.stop_words_ids),
                           logits_processors=logits_processors)
        response = tokenizer.decode([t for t in new if t != tokenizer.eod_id])
        history = [(query, response)]
    print("response:", response)
    result = {"response": response, "picture": None}
    if args.visual:
        image = draw_bbox_on_latest_picture(response, history)
        if image is not None:
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, "pred.jpg")
            image.save(path)
            print("grounding picture:", path)
            result["picture"] = path
    return result


def main(argv=None) -> int:
    predict(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
