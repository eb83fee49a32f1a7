from .norm import RMSNorm, LayerNorm, rms_norm  # noqa: F401
from .rotary import (rope_inv_freq, rope_cos_sin, apply_rotary, rotate_half, qwen_ntk_alpha, ntk_scaled_base,  # noqa: F401
                     logn_scale, dynamic_ntk_base, vision_rope_2d)
from .attention import (KVCache, attention, causal_keep_mask, block_diagonal_mask, VisionAttention,  # noqa: F401
                        decoder_inputs)
from .mlp import SwiGLU, GeluMLP, swiglu, quick_gelu, activation  # noqa: F401
from .vit import ViTBlock, CLIPVisionConfig, CLIPVisionTower  # noqa: F401
