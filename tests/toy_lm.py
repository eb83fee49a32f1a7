"""A tiny decoder LM built only from the shared layers (test helper; not a model family).

Used by the generation tests (cache vs recompute, batching) and by the family-free parity-harness test."""
import paddle
from paddle import nn

from paddlevl.layers import (KVCache, RMSNorm, SwiGLU, apply_rotary, attention, causal_keep_mask, rope_cos_sin,
                             rope_inv_freq)


class Block(nn.Layer):
    def __init__(self, d, nh, nkv, ffn, eps):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, d // nh
        self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.q = nn.Linear(d, nh * self.hd)
        self.k = nn.Linear(d, nkv * self.hd)
        self.v = nn.Linear(d, nkv * self.hd)
        self.o = nn.Linear(nh * self.hd, d, bias_attr=False)
        self.mlp = SwiGLU(d, ffn)

    def forward(self, x, rope, keep, cache, i):
        b, l, _ = x.shape
        h = self.norm1(x)
        q = apply_rotary(self.q(h).reshape([b, l, self.nh, self.hd]), *rope)
        k = apply_rotary(self.k(h).reshape([b, l, self.nkv, self.hd]), *rope)
        v = self.v(h).reshape([b, l, self.nkv, self.hd])
        k, v = cache.update(i, k, v)
        x = x + self.o(attention(q, k, v, keep))
        return x + self.mlp(self.norm2(x))


class ToyLM(nn.Layer):
    def __init__(self, vocab=50, d=32, layers=2, nh=4, nkv=2, ffn=48, eps=1e-6, base=10000.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.LayerList([Block(d, nh, nkv, ffn, eps) for _ in range(layers)])
        self.norm = RMSNorm(d, eps)
        self.lm_head = nn.Linear(d, vocab, bias_attr=False)
        self.inv_freq = rope_inv_freq(d // nh, base)

    def new_cache(self):
        return KVCache(len(self.layers))

    def embed(self, ids):
        return self.embed_tokens(ids)

    def forward_embeds(self, x, attention_mask, position_ids, cache):
        rope = rope_cos_sin(position_ids, self.inv_freq)
        keep = causal_keep_mask(attention_mask, x.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, keep, cache, i)
        return self.lm_head(self.norm(x)).astype("float32")
