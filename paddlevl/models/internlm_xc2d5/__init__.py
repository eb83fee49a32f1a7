"""InternLM-XComposer-2.5 family: InternLM2 + Partial-LoRA, CLIP ViT-L/14-560 HD vision, sentencepiece tokenizer.

Registration only: the heavy modules are imported when a family function is first called."""
from ..registry import Family, register

CLIP_SUBDIR = "internlm-xcomposer2d5-clip"


def _parse_config(cfg, folder=None):
    from .config import IXCConfig
    return IXCConfig.from_dict(cfg, folder=folder)


def _build_model(cfg):
    from .modeling import InternLMXComposer2
    return InternLMXComposer2(cfg)


def _rules(cfg, source_keys):
    from convert.rules.internlm_xc2d5 import rules
    return rules(cfg, source_keys)


def _golden(model, fixture_dir, inputs):
    from .golden import golden
    return golden(model, fixture_dir, inputs)


def _chat_session(folder, model=None, **kw):
    from .chat import chat_session
    return chat_session(folder, model, **kw)


register(Family(
    name="ixc2d5",
    architectures=("InternLMXComposer2ForCausalLM",),
    model_types=(),  # "internlm2" is shared with text-only InternLM2: detect by the architecture name
    parse_config=_parse_config,
    build_model=_build_model,
    rules=_rules,
    # the CLIP tower's config lives in a sub-folder next to the weights and must keep its relative path
    extra_files=("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 f"{CLIP_SUBDIR}/config.json"),
    golden=_golden,
    chat_session=_chat_session,
    description="InternLM-XComposer-2.5 (InternLM2 + Partial-LoRA, CLIP ViT-L/14-560 HD tiles)",
))
