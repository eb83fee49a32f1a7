"""POINTS family: POINTS-1.5 (NaViT vision tower + patch merger + Qwen2.5 LLM) and POINTS 1.0 (POINTS-Qwen-2.5,
two CLIP towers). Both share the LLM (llm.py) and the Qwen2 tokenizer (tokenizer.py).

Registration only: the heavy modules are imported when a family function is first called."""
from ..registry import Family, register


# ---- POINTS-1.5 -----------------------------------------------------------------------------------------------
def _v15_parse_config(cfg):
    from .modeling_v15 import POINTSV15Config
    return POINTSV15Config.from_dict(cfg)


def _v15_build_model(cfg):
    from .modeling_v15 import POINTSV15ChatModel
    return POINTSV15ChatModel(cfg)


def _v15_rules(cfg, source_keys):
    from convert.rules.points import v15_rules
    return v15_rules(cfg, source_keys)


def _v15_golden(model, fixture_dir, inputs):
    from .golden_v15 import golden
    return golden(model, fixture_dir, inputs)


def _v15_chat_session(folder, model=None, **kw):
    from .chat_v15 import chat_session
    return chat_session(folder, model, **kw)


register(Family(
    name="points_v15",
    architectures=("POINTSV15ChatModel",),
    model_types=("pointsv1.5_chat",),
    parse_config=_v15_parse_config,
    build_model=_v15_build_model,
    rules=_v15_rules,
    extra_files=("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "preprocessor_config.json", "generation_config.json"),
    golden=_v15_golden,
    chat_session=_v15_chat_session,
    description="WePOINTS POINTS-1.5 (Qwen2-VL NaViT + patch merger + Qwen2.5 LLM)",
))

# ---- POINTS 1.0 (POINTS-Qwen-2.5): registered below by its own module lines ----------------------------------


def _v1_parse_config(cfg):
    from .modeling_v1 import PointsV1Config
    return PointsV1Config.from_dict(cfg)


def _v1_build_model(cfg):
    from .modeling_v1 import PointsV1ChatModel
    return PointsV1ChatModel(cfg)


def _v1_rules(cfg, source_keys):
    from convert.rules.points_v1 import v1_rules
    return v1_rules(cfg, source_keys)


def _v1_golden(model, fixture_dir, inputs):
    from .golden_v1 import golden
    return golden(model, fixture_dir, inputs)


def _v1_chat_session(folder, model=None, **kw):
    from .chat_v1 import chat_session
    return chat_session(folder, model, **kw)


register(Family(
    name="points_qwen2_5",
    architectures=("POINTSChatModel",),  # config.json has no top-level model_type
    parse_config=_v1_parse_config,
    build_model=_v1_build_model,
    rules=_v1_rules,
    extra_files=("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "preprocessor_config.json", "generation_config.json"),
    golden=_v1_golden,
    chat_session=_v1_chat_session,
    description="WePOINTS POINTS 1.0 / POINTS-Qwen-2.5 (two CLIP ViT-L/336 towers + CATTY + POINTS LLM)",
))
