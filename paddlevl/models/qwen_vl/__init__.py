"""Qwen-VL-Chat family (QWenLMHeadModel with the ViT-bigG visual encoder and 256-query resampler).

Registration only: the heavy modules are imported when a family function is first called."""
from ..registry import Family, register


def _parse_config(cfg):
    from .config import parse_config
    return parse_config(cfg)


def _build_model(cfg):
    from .modeling import QwenVLForCausalLM
    return QwenVLForCausalLM(cfg)


def _rules(cfg, source_keys):
    from convert.rules.qwen_vl import rules
    return rules(cfg, source_keys)


def _detect(cfg, source_keys=()):
    # QWen-7B (text only) shares the architecture name; Qwen-VL has the `visual` section
    return isinstance(cfg.get("visual"), dict)


def _golden(model, fixture_dir, inputs):
    from .golden import golden
    return golden(model, fixture_dir, inputs)


def _chat_session(folder, model=None, **kw):
    from .chat import chat_session
    return chat_session(folder, model, **kw)


FAMILY = register(Family(
    name="qwen_vl",
    architectures=("QWenLMHeadModel",),
    model_types=("qwen",),
    parse_config=_parse_config,
    build_model=_build_model,
    rules=_rules,
    extra_files=("qwen.tiktoken", "generation_config.json", "tokenizer_config.json", "SimSun.ttf"),
    detect=_detect,
    golden=_golden,
    chat_session=_chat_session,
    description="Qwen-VL-Chat (QWen LLM + ViT-bigG visual encoder + 256-query resampler, tiktoken, grounding)",
))
