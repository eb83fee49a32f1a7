"""paddlevl: PaddlePaddle ports of Qwen-VL-Chat, POINTS(-1.5) and InternLM-XComposer2.5."""
import warnings

# Paddle warns at import time that ccache is missing (only relevant when compiling custom ops).
warnings.filterwarnings("ignore", message="No ccache found")

__version__ = "0.1.0"
