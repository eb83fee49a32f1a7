"""Appflow front door: errors a user meets before any model runs (per-family chat is tested in the family files)."""
import json

import pytest

from paddlevl.appflow import Appflow


def test_unknown_app_lists_available():
    with pytest.raises(ValueError, match="image2text_generation"):
        Appflow(app="text2image", models=["x"])


def test_models_are_local_folders(tmp_path):
    with pytest.raises(ValueError, match="models="):
        Appflow(app="image2text_generation", models=[])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Appflow(app="image2text_generation", models=["qwen-vl/qwen-vl-chat-7b"])


def test_folder_must_be_converted(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Appflow(app="image2text_generation", models=[str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"]}))
    with pytest.raises(ValueError, match="paddlevl convert"):
        Appflow(app="image2text_generation", models=[str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"paddlevl": {"family": "no_such_family"}}))
    with pytest.raises(KeyError, match="known:.*qwen_vl"):
        Appflow(app="image2text_generation", models=[str(tmp_path)])
