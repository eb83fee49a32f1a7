"""The POINTS language model (POINTS 1.0 and POINTS-1.5): a Qwen2.5-style decoder.

Upstream ships it in two key layouts with the same math:
- "customllama" (WePOINTS CustomLlamaForCausalLM, the HF releases): llm_config keys num_layers, num_kv_heads,
  ffn_hidden_size, layernorm_epsilon, rotary_emb_base, rotary_pct, rotary_compress, qkv_proj_bias, ...
- "qwen2" (transformers Qwen2ForCausalLM, e.g. POINTS-Reader): num_hidden_layers, num_key_value_heads,
  intermediate_size, rms_norm_eps, rope_theta.
Both map onto one Paddle model with Qwen2 parameter names (the converter tables split the fused upstream
tensors):

    model.embed_tokens.weight                        [V, H]
    model.layers.N.input_layernorm.weight            [H]
    model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}   weight [H, heads*hd] / [H, kv*hd] (paddle [in, out])
    model.layers.N.self_attn.o_proj.weight           [heads*hd, H]
    model.layers.N.post_attention_layernorm.weight   [H]
    model.layers.N.mlp.{gate,up}_proj.weight [H, F], mlp.down_proj.weight [F, H]
    model.norm.weight                                [H]
    lm_head.weight                                   [H, V]  (absent when tie_word_embeddings)

Block: h = x + o(Attn(RMSNorm(x))); y = h + down(silu(gate(n)) * up(n)), n = RMSNorm(h); final RMSNorm; head.
RoPE rotate-half over the first rotary_dim dims of every head, in float32; GQA with query head i -> kv head
i // (heads / kv_heads); scores and softmax in float32.

Decoder protocol (DESIGN.md): `embed(ids)`, `forward_embeds(embeds, attention_mask, position_ids, cache)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from ...layers import (KVCache, RMSNorm, SwiGLU, apply_rotary, attention, causal_keep_mask, decoder_inputs,
                      rope_inv_freq)


@dataclass
class PointsLLMConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rms_eps: float
    rope_base: float
    head_dim: int
    rotary_dim: int           # leading dims of each head that rotate (rotary_pct * head_dim)
    rotary_compress: float = 1.0   # positions are multiplied by this (CustomLlama rotary_compress)
    qkv_bias: bool = True
    out_bias: bool = False
    mlp_fc1_bias: bool = False     # gate/up bias
    mlp_fc2_bias: bool = False     # down bias
    tie_word_embeddings: bool = False
    layout: str = "customllama"    # which upstream key layout the config describes ("customllama" | "qwen2")

    @classmethod
    def from_dict(cls, d: dict) -> "PointsLLMConfig":
        """Parse an upstream llm_config dict of either layout (CustomLlama keys win when both are present)."""
        d = dict(d)
        if "llm_config" in d:
            d = dict(d["llm_config"])
        custom = any(d.get(k) is not None for k in ("num_layers", "num_kv_heads", "ffn_hidden_size",
                                                    "layernorm_epsilon", "rotary_emb_base")) \
            or d.get("model_type") == "custom_llama"

        def pick(*names, default=None, required=True):
            for n in names:
                if d.get(n) is not None:
                    return d[n]
            if required and default is None:
                raise KeyError(f"llm_config lacks {' / '.join(names)}")
            return default

        hidden = int(pick("hidden_size"))
        heads = int(pick("num_attention_heads"))
        kv = int(pick("num_kv_heads", "num_key_value_heads", default=heads))
        head_dim = int(pick("head_dim", default=hidden // heads)) if not custom else hidden // heads
        if custom:
            act = d.get("hidden_act", "swiglu")
            if act != "swiglu":
                raise NotImplementedError(f"CustomLlama hidden_act {act!r}: only 'swiglu' is supported")
            if d.get("norm_type", "rms_norm") != "rms_norm":
                raise NotImplementedError(f"CustomLlama norm_type {d.get('norm_type')!r}: only 'rms_norm'")
            pct = float(d.get("rotary_pct", 1.0))
            cfg = cls(
                vocab_size=int(pick("vocab_size")), hidden_size=hidden,
                num_layers=int(pick("num_layers", "num_hidden_layers")), num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=int(pick("ffn_hidden_size", "intermediate_size")),
                rms_eps=float(pick("layernorm_epsilon", "rms_norm_eps")),
                rope_base=float(pick("rotary_emb_base", "rope_theta", default=10000.0)),
                head_dim=head_dim, rotary_dim=int(head_dim * pct),
                rotary_compress=float(d.get("rotary_compress", 1.0)),
                # CustomLlama reads these with getattr(config, name, True)
                qkv_bias=bool(d.get("qkv_proj_bias", True)), out_bias=bool(d.get("out_proj_bias", True)),
                mlp_fc1_bias=bool(d.get("mlp_fc1_bias", True)), mlp_fc2_bias=bool(d.get("mlp_fc2_bias", True)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), layout="customllama")
        else:
            act = d.get("hidden_act", "silu")
            if act != "silu":
                raise NotImplementedError(f"Qwen2 hidden_act {act!r}: only 'silu' is supported")
            scaling = d.get("rope_scaling")
            if scaling and (scaling.get("type") or scaling.get("rope_type")) not in (None, "default"):
                raise NotImplementedError(f"rope_scaling {scaling!r} is not supported")
            cfg = cls(
                vocab_size=int(pick("vocab_size")), hidden_size=hidden,
                num_layers=int(pick("num_hidden_layers")), num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=int(pick("intermediate_size")), rms_eps=float(pick("rms_norm_eps")),
                rope_base=float(pick("rope_theta", default=10000.0)), head_dim=head_dim, rotary_dim=head_dim,
                qkv_bias=True, out_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), layout="qwen2")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_attention_heads {cfg.num_heads} is not a multiple of kv heads {cfg.num_kv_heads}")
        if cfg.rotary_dim % 2:
            raise ValueError(f"rotary dim {cfg.rotary_dim} must be even")
        return cfg


def _round_to(x: float, dtype: str) -> float:
    """x rounded (to nearest even) to float16 / bfloat16, as a Python float."""
    if dtype == "float16":
        return float(np.float16(x))
    u = np.array([x], dtype=np.float32).view(np.uint32)
    u = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)
    return float(u.view(np.float32)[0])


class Attention(nn.Layer):
    def __init__(self, cfg: PointsLLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_b = None if cfg.qkv_bias else False
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias_attr=qkv_b)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias_attr=qkv_b)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias_attr=qkv_b)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                bias_attr=None if cfg.out_bias else False)
        self.head_scale = math.sqrt(cfg.head_dim)
        # CustomLlama keeps sqrt(head_dim) as a tensor in the load dtype: loaded in bf16/fp16 it is rounded
        # (sqrt(128) = 11.3137 -> 11.3125) and the scale is computed in that dtype; Qwen2 uses the exact value.
        self.lowp_scale = cfg.layout == "customllama"
        self._scales = {}

    def scale_for(self, dtype) -> float:
        key = str(dtype)
        if key not in self._scales:
            if self.lowp_scale and dtype in (paddle.bfloat16, paddle.float16):
                low = "bfloat16" if dtype == paddle.bfloat16 else "float16"
                val = _round_to(1.0 / _round_to(self.head_scale, low), low)
            else:
                val = float(np.float32(1.0) / np.float32(self.head_scale))
            self._scales[key] = val
        return self._scales[key]

    def forward(self, x, rope, keep_mask, cache: KVCache | None, layer_idx: int):
        b, l, _ = x.shape
        q = self.q_proj(x).reshape([b, l, self.heads, self.head_dim])
        k = self.k_proj(x).reshape([b, l, self.kv_heads, self.head_dim])
        v = self.v_proj(x).reshape([b, l, self.kv_heads, self.head_dim])
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        return self.o_proj(attention(q, k, v, keep_mask, scale=self.scale_for(x.dtype)))


class DecoderLayer(nn.Layer):
    def __init__(self, cfg: PointsLLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.mlp_fc1_bias)
        if cfg.mlp_fc2_bias != cfg.mlp_fc1_bias:
            self.mlp.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size,
                                           bias_attr=None if cfg.mlp_fc2_bias else False)

    def forward(self, x, rope, keep_mask, cache, layer_idx):
        h = x + self.self_attn(self.input_layernorm(x), rope, keep_mask, cache, layer_idx)
        return h + self.mlp(self.post_attention_layernorm(h))


class PointsLLMModel(nn.Layer):
    def __init__(self, cfg: PointsLLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.LayerList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class PointsLLM(nn.Layer):
    """Causal LM: `model` (embeddings, blocks, final norm) + `lm_head`. Implements the decoder protocol."""

    def __init__(self, cfg: PointsLLMConfig):
        super().__init__()
        self.config = cfg
        self.model = PointsLLMModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias_attr=False)
        self._inv_freq = None

    # -- decoder protocol --------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def forward_embeds(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                       last_only: bool = False, **_):
        """Logits [B, L, V] float32 (only the last position, [B, 1, V], when last_only)."""
        h = self.hidden_states(inputs_embeds, attention_mask, position_ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    # -- pieces ------------------------------------------------------------------------------------------
    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Output of the final RMSNorm [B, L, H] (the LM head's input)."""
        attention_mask, position_ids = decoder_inputs(inputs_embeds, attention_mask, position_ids, cache)
        rope = self.rope(position_ids)
        keep = causal_keep_mask(attention_mask, inputs_embeds.shape[1])
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, keep, cache, i)
        return self.model.norm(x)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            out = paddle.matmul(hidden, self.model.embed_tokens.weight, transpose_y=True)
        else:
            out = self.lm_head(hidden)
        return out.astype("float32")

    def rope(self, position_ids):
        """cos, sin [B, L, rotary_dim] float32 for integer positions (scaled by rotary_compress)."""
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(self.config.rotary_dim, self.config.rope_base)
        pos = position_ids.astype("float32")
        if self.config.rotary_compress != 1.0:
            pos = pos * self.config.rotary_compress
        freqs = pos.unsqueeze(-1) * self._inv_freq.reshape([1, 1, -1])
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self.forward_embeds(inputs_embeds, attention_mask, position_ids, cache)
