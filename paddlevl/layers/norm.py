"""Normalisation layers. Every epsilon is explicit: the towers we port use 1e-5 and 1e-6, and Paddle's
LayerNorm default (1e-5) is wrong for several of them."""
from paddle import nn

import external_ops


def rms_norm(x, weight, eps):
    """(x.float() * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight — statistics always in float32.

    Runs the fused C++/CUDA kernel when it is built (external_ops; PADDLEVL_FUSED=0/1 forces a path)."""
    return external_ops.rms_norm(x, weight, eps)


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
