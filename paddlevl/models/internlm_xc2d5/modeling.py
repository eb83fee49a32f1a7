"""InternLM-XComposer-2.5 in Paddle: InternLM2 with Partial-LoRA, the CLIP-560 HD vision path, the projector.

Parameters keep the upstream names (Linear weights transposed to Paddle's [in, out]):

    model.tok_embeddings.weight                                  [V, H]
    model.layers.N.attention.wqkv.{weight, Plora_A.weight, Plora_B.weight}   [H, (nh+2kv)d], [H, r], [r, (nh+2kv)d]
    model.layers.N.attention.wo.{weight, Plora_A.weight, Plora_B.weight}
    model.layers.N.feed_forward.{w1, w2, w3}.{weight, Plora_A.weight, Plora_B.weight}
    model.layers.N.{attention_norm, ffn_norm}.weight, model.norm.weight
    output.weight                                                [H, V] (absent when tie_word_embeddings: the head
                                                                 then reads tok_embeddings, as HF ties them)
    plora_glb_GN [1, 1, 4C], plora_sub_GN [1, 1, 1, 4C]
    vision_proj.{0, 2}.{weight, bias}                            [4C, H], [H, H]
    vit.vision_tower.vision_model.*                              HF CLIPVisionModel names (paddlevl.layers.vit)

Math (upstream modeling_internlm2.py / build_mlp.py):
- PLoRA: y = W x (+ b); at im_mask rows y += Plora_B(Plora_A(x)) * alpha / r. Decode steps never have im_mask.
- wqkv rows are grouped per kv head: [q_{h*g} .. q_{h*g+g-1}, k_h, v_h] for each kv head h (g = heads / kv_heads).
- RoPE rotate-half; cos/sin from a float32 table cast to the activation dtype. rope_scaling "dynamic": once a
  sequence longer than max_position_embeddings is seen, the base becomes
  theta * (f * L / max - (f - 1))^(d / (d - 2)) and stays so for the module's lifetime (upstream caches it);
  "linear": positions / f.
- attention softmax in float32, MLP w2(silu(w1 x) * w3 x), RMSNorm statistics in float32, logits float32.
- Vision: crops [global, tiles] -> CLIP last hidden state (no post_layernorm) without CLS -> 2x2 merge to 4C ->
  global 20x20 + sub_GN column, glb_GN, tiles re-assembled to (20h)x(20w) + sub_GN column -> vision_proj.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ...layers import (KVCache, RMSNorm, attention, causal_keep_mask, decoder_inputs, dynamic_ntk_base,
                      rotate_half)
from ...layers.vit import CLIPVisionTower
from .config import IXCConfig


# ------------------------------------------------------------------------------------------------ LLM
class PLoRA(nn.Layer):
    """Linear with a Partial-LoRA branch that only image positions take."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: int, bias: bool = False):
        super().__init__()
        self.weight = self.create_parameter([in_features, out_features])
        self.bias = self.create_parameter([out_features], is_bias=True) if bias else None
        self.Plora_A = nn.Linear(in_features, rank, bias_attr=False)
        self.Plora_B = nn.Linear(rank, out_features, bias_attr=False)
        self.scaling = alpha / rank

    def forward(self, x, im_rows=None):
        """x [B, L, in]; im_rows: int64 indices into the flattened B*L rows that are image positions (or None)."""
        b, l, c = x.shape
        flat = x.reshape([b * l, c])
        out = F.linear(flat, self.weight, self.bias)
        if im_rows is not None and im_rows.shape[0] > 0:
            part = paddle.gather(flat, im_rows)
            delta = self.Plora_B(self.Plora_A(part))
            if self.scaling != 1.0:
                delta = delta * self.scaling
            out = paddle.index_add(out, im_rows, 0, delta)
        return out.reshape([b, l, out.shape[-1]])


def apply_rotary_upstream(x, cos, sin):
    """HF apply_rotary_pos_emb: x [B, L, heads, D]; cos/sin float32 [B, L, D] cast to x's dtype first."""
    c = cos.astype(x.dtype).unsqueeze(2)
    s = sin.astype(x.dtype).unsqueeze(2)
    return x * c + rotate_half(x) * s


class Attention(nn.Layer):
    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.groups = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                                 cfg.kv_groups)
        self.wqkv = PLoRA(cfg.hidden_size, cfg.qkv_size, cfg.plora_rank, cfg.plora_alpha, bias=cfg.bias)
        self.wo = PLoRA(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.plora_rank, cfg.plora_alpha,
                        bias=cfg.bias)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, rope, keep_mask, cache: Optional[KVCache], layer_idx: int, im_rows=None):
        b, l, _ = x.shape
        qkv = self.wqkv(x, im_rows).reshape([b, l, self.kv_heads, self.groups + 2, self.head_dim])
        q = qkv[:, :, :, : self.groups, :].reshape([b, l, self.heads, self.head_dim])
        k = qkv[:, :, :, self.groups, :]
        v = qkv[:, :, :, self.groups + 1, :]
        q, k = apply_rotary_upstream(q, *rope), apply_rotary_upstream(k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        return self.wo(attention(q, k, v, keep_mask, scale=self.scale), im_rows)


class FeedForward(nn.Layer):
    def __init__(self, cfg: IXCConfig):
        super().__init__()
        h, i, r, a = cfg.hidden_size, cfg.intermediate_size, cfg.plora_rank, cfg.plora_alpha
        self.w1 = PLoRA(h, i, r, a)  # gate
        self.w3 = PLoRA(h, i, r, a)  # up
        self.w2 = PLoRA(i, h, r, a)  # down

    def forward(self, x, im_rows=None):
        return self.w2(F.silu(self.w1(x, im_rows)) * self.w3(x, im_rows), im_rows)


class DecoderLayer(nn.Layer):
    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(self, x, rope, keep_mask, cache, layer_idx, im_rows=None):
        h = x + self.attention(self.attention_norm(x), rope, keep_mask, cache, layer_idx, im_rows)
        return h + self.feed_forward(self.ffn_norm(h), im_rows)


class InternLM2Model(nn.Layer):
    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.LayerList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class RotaryTable:
    """Upstream InternLM2(DynamicNTK|Linear)RotaryEmbedding state: inv_freq and the length it was built for."""

    def __init__(self, cfg: IXCConfig):
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.max_pos = cfg.max_position_embeddings
        self.kind, self.factor = cfg.rope_scaling_type, cfg.rope_scaling_factor
        self.cached_len = self.max_pos
        self.base = self.theta
        self._inv_freq = None

    def inv_freq(self, kv_len: int):
        if kv_len > self.cached_len:
            self.cached_len = kv_len
            if self.kind == "dynamic":  # recomputed from the ORIGINAL theta at the new length, then kept
                self.base = dynamic_ntk_base(self.theta, self.dim, kv_len, self.max_pos, self.factor)
                self._inv_freq = None
        if self._inv_freq is None:
            exponent = paddle.arange(0, self.dim, 2, dtype="float32") / float(self.dim)
            self._inv_freq = 1.0 / paddle.pow(paddle.full([], self.base, dtype="float32"), exponent)
        return self._inv_freq

    def cos_sin(self, position_ids, kv_len: int):
        inv = self.inv_freq(kv_len)
        t = position_ids.astype("float32")
        if self.kind == "linear":
            t = t / self.factor
        freqs = t.unsqueeze(-1) * inv.reshape([1, 1, -1])
        emb = paddle.concat([freqs, freqs], axis=-1)
        return paddle.cos(emb), paddle.sin(emb)


# ------------------------------------------------------------------------------------------------ vision
class VisionTower(nn.Layer):
    """Holder so the CLIP parameters sit under `vit.vision_tower.vision_model.*` like upstream."""

    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.vision_model = CLIPVisionTower(cfg.vision)


class ViT(nn.Layer):
    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.vision_tower = VisionTower(cfg)


# ------------------------------------------------------------------------------------------------ full model
class InternLMXComposer2(nn.Layer):
    """The chat model. Implements the decoder protocol (embed / forward_embeds(..., im_mask=) / new_cache)."""

    vit_batch = 4  # crops per CLIP tower call

    def __init__(self, cfg: IXCConfig):
        super().__init__()
        self.config = cfg
        self.model = InternLM2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias_attr=False)
        m = cfg.vision_merged_size
        self.plora_glb_GN = self.create_parameter([1, 1, m], default_initializer=nn.initializer.Constant(0.0))
        self.plora_sub_GN = self.create_parameter([1, 1, 1, m], default_initializer=nn.initializer.Constant(0.0))
        self.vit = ViT(cfg)
        self.vision_proj = nn.Sequential(nn.Linear(m, cfg.hidden_size), nn.GELU(),
                                         nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.rotary = RotaryTable(cfg)

    @property
    def llm(self):
        return self

    def chat(self, tokenizer, query: str, image=(), hd_num: int = 24, history=(), **kwargs):
        """Upstream call shape: model.chat(tokenizer, query, image=[...], hd_num=24, history=[...], ...) ->
        (response, history). See paddlevl.models.internlm_xc2d5.chat.chat for the options."""
        from .chat import chat
        return chat(self, tokenizer, query, image=image, hd_num=hd_num, history=history, **kwargs)

    # -- decoder protocol ------------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def embed(self, input_ids):
        return self.model.tok_embeddings(input_ids)

    def forward_embeds(self, inputs_embeds, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                       im_mask=None, last_only: bool = False, hidden_states: Optional[list] = None, **_):
        """Logits [B, L, V] float32. im_mask [B, L] (bool / 0-1): rows that take the Partial-LoRA branch.
        `hidden_states`, when a list, receives the upstream output_hidden_states tensors."""
        h = self.decode(inputs_embeds, attention_mask, position_ids, cache, im_mask, hidden_states)
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    def head(self, h):
        """Final hidden states [B, L, H] -> logits float32 (untied `output`, or tok_embeddings when tied)."""
        if self.config.tie_word_embeddings:
            return paddle.matmul(h, self.model.tok_embeddings.weight, transpose_y=True).astype("float32")
        return self.output(h).astype("float32")

    def decode(self, inputs_embeds, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
               im_mask=None, hidden_states: Optional[list] = None):
        """Final-norm hidden states [B, L, H]."""
        b, l = inputs_embeds.shape[0], inputs_embeds.shape[1]
        past = cache.seq_len if cache is not None else 0
        attention_mask, position_ids = decoder_inputs(inputs_embeds, attention_mask, position_ids, cache)
        im_rows = None
        if im_mask is not None:
            m = paddle.to_tensor(im_mask) if not isinstance(im_mask, paddle.Tensor) else im_mask
            if list(m.shape) != [b, l]:
                raise ValueError(f"im_mask shape {list(m.shape)} does not match the input [{b}, {l}]")
            im_rows = paddle.nonzero(m.astype("bool").reshape([-1])).reshape([-1])
            if im_rows.shape[0] == 0:
                im_rows = None
        rope = self.rotary.cos_sin(position_ids, past + l)
        keep = causal_keep_mask(attention_mask, l)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, rope, keep, cache, i, im_rows)
        x = self.model.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    # -- vision ----------------------------------------------------------------------------------------------
    def vit_features(self, crops):
        """crops [N, 3, T, T] -> CLIP last hidden state without CLS [N, g*g, C]."""
        tower = self.vit.vision_tower.vision_model
        crops = crops.astype(tower.embeddings.patch_embedding.weight.dtype)
        # a few crops per tower call bound the attention scores' memory (25 crops of the real tower would need
        # 25 x 16 x 1601^2 float32 scores at once); crops are independent, so the result is the same
        parts = [tower(crops[i:i + self.vit_batch])[-1][:, 1:] for i in range(0, crops.shape[0], self.vit_batch)]
        return parts[0] if len(parts) == 1 else paddle.concat(parts, axis=0)

    def merge_hd(self, feats, tiles_hw):
        """CLIP features of one image ([1 + h*w, g*g, C]: global, tiles row-major) -> [1, n, 4C] with separators."""
        h, w = tiles_hw
        n, p, c = feats.shape
        g = int(round(math.sqrt(p)))
        if g * g != p or g % 2 or n != 1 + h * w:
            raise ValueError(f"vision features {list(feats.shape)} do not fit {h}x{w} tiles of a square even grid")
        s = g // 2

        def merge2x2(x):  # [k, g*g, C] -> [k, s, s, 4C], channel blocks (r0,c0),(r0,c1),(r1,c0),(r1,c1)
            k = x.shape[0]
            return x.reshape([k, s, 2, s, 2, c]).transpose([0, 1, 3, 2, 4, 5]).reshape([k, s, s, 4 * c])

        glb = merge2x2(feats[:1])  # [1, s, s, 4C]
        glb = paddle.concat([glb, self.plora_sub_GN.expand([1, s, 1, 4 * c]).astype(glb.dtype)], axis=2)
        sub = merge2x2(feats[1:])  # [h*w, s, s, 4C]
        sub = sub.reshape([1, h, w, s, s, 4 * c]).transpose([0, 1, 3, 2, 4, 5]).reshape([1, h * s, w * s, 4 * c])
        sub = paddle.concat([sub, self.plora_sub_GN.expand([1, h * s, 1, 4 * c]).astype(sub.dtype)], axis=2)
        return paddle.concat([glb.reshape([1, -1, 4 * c]), self.plora_glb_GN.astype(glb.dtype),
                              sub.reshape([1, -1, 4 * c])], axis=1)

    def encode_image(self, pixel_values, debug: Optional[dict] = None):
        """One normalised HD pixel tensor [1, 3, h*T, w*T] (numpy or paddle) -> visual embeddings [1, n, H]."""
        from .processing import vit_crops

        px = pixel_values.numpy() if isinstance(pixel_values, paddle.Tensor) else np.asarray(pixel_values)
        crops, hw = vit_crops(px.astype(np.float32), self.config.tile_size)
        feats = self.vit_features(paddle.to_tensor(crops))
        if debug is not None:
            debug["crops"], debug["vit_features"] = crops, feats
        merged = self.merge_hd(feats, hw)
        return self.vision_proj(merged.astype(self.vision_proj[0].weight.dtype))

    def build_embeds(self, input_ids, image_embeds: Sequence):
        """input_ids [1, L] with -1 at visual slots (numpy) + per-image embeddings in order -> (embeds [1, L, H],
        im_mask [1, L] bool). Every run of visual slots is filled by the next image's embeddings."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"expected input_ids [1, L], got {list(ids.shape)}")
        mask = ids < 0
        text = paddle.to_tensor(np.where(mask, 0, ids))
        embeds = self.embed(text)
        slots = np.nonzero(mask[0])[0]
        if len(slots):
            vis = paddle.concat([e.reshape([-1, e.shape[-1]]) for e in image_embeds], axis=0) if image_embeds \
                else None
            if vis is None or vis.shape[0] < len(slots):
                raise ValueError(f"{len(slots)} visual slots but {0 if vis is None else vis.shape[0]} visual "
                                 f"embeddings")
            vis = vis[: len(slots)].astype(embeds.dtype)  # the max_length cut may end inside the last image
            idx = paddle.to_tensor(slots.astype(np.int64))
            flat = embeds.reshape([-1, embeds.shape[-1]])
            flat = paddle.scatter(flat, idx, vis, overwrite=True)
            embeds = flat.reshape(embeds.shape)
        return embeds, mask
