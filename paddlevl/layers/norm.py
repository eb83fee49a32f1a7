"""Normalisation layers. Every epsilon is explicit: the towers we port use 1e-5 and 1e-6, and Paddle's
LayerNorm default (1e-5) is wrong for several of them."""
import paddle
from paddle import nn


def rms_norm(x, weight, eps):
    """(x.float() * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight — statistics always in float32."""
    h = x.astype("float32")
    h = h * paddle.rsqrt(h.pow(2).mean(axis=-1, keepdim=True) + eps)
    return h.astype(x.dtype) * weight


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = float(eps)
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """paddle.nn.LayerNorm with a mandatory epsilon (parameters `weight`, `bias`, as in torch)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, epsilon=float(eps))
