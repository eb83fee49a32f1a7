"""Feed-forward blocks. Upstream gate/up naming differs per family (Qwen-VL w2 = gate, InternLM2 w1 = gate,
POINTS dense_h_to_4h = [up; gate]); the converter tables map every one of them onto gate_proj / up_proj."""
import paddle.nn.functional as F
from paddle import nn

import external_ops


def quick_gelu(x):
    return x * F.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate=False),
    "gelu_tanh": lambda x: F.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def swiglu(gate, up):
    """silu(gate) * up — fused kernel when built (external_ops), else composite."""
    return external_ops.swiglu(gate, up)


class SwiGLU(nn.Layer):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        b = None if bias else False
        self.gate_proj = nn.Linear(hidden, ffn, bias_attr=b)
        self.up_proj = nn.Linear(hidden, ffn, bias_attr=b)
        self.down_proj = nn.Linear(ffn, hidden, bias_attr=b)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nn.Layer):
    """fc2(act(fc1(x))) — the ViT / CLIP MLP (HF names fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: str = "gelu", bias: bool = True):
        super().__init__()
        b = None if bias else False
        self.fc1 = nn.Linear(dim, hidden, bias_attr=b)
        self.fc2 = nn.Linear(hidden, dim if out is None else out, bias_attr=b)
        self.act = activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
