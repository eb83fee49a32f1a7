"""Fused (external_ops C++) vs composite Paddle path on 7B-sized shapes: prints times and composite/fused ratios.

    python bench/bench_external_ops.py [--repeat 20] [--dtypes float32,bfloat16]

Shapes: rms_norm over D=4096 and swiglu over F=11008 (Llama/Qwen-7B) and F=18944 (Qwen2-7B) on a [1, 512, .]
input, rotary on [1, 512, 32, 128]. Times are medians of --repeat calls after one warm-up, on whatever CPU this is;
the ops build on first use (PADDLEVL_OPS_DIR / ~/.cache/paddlevl/ops). Never used as an assertion anywhere.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import external_ops  # noqa: E402


def timed_ms(fn, repeat):
    """(median, best) of `repeat` calls after one warm-up, in milliseconds."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def rel(a, b):
    a, b = a.astype("float32").numpy(), b.astype("float32").numpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    os.environ[external_ops.ENV_MODE] = "1"  # the fused calls below must really be fused
    external_ops.ensure_built(build=True, retry=True)
    paddle.seed(0)
    cases = []
    for dtype in args.dtypes.split(","):
        x = paddle.randn([1, 512, 4096]).astype(dtype)
        w = paddle.randn([4096]).astype(dtype)
        cases.append((f"rms_norm   [1,512,4096]   {dtype}", lambda x=x, w=w: external_ops.rms_norm(x, w, 1e-6),
                      lambda x=x, w=w: external_ops.rms_norm_composite(x, w, 1e-6), None))
        for ffn in (11008, 18944):
            a = paddle.randn([1, 512, ffn]).astype(dtype)
            b = paddle.randn([1, 512, ffn]).astype(dtype)
            builtin = (lambda a=a, b=b: F.swiglu(a, b)) if dtype == "float32" else None
            cases.append((f"swiglu     [1,512,{ffn}]  {dtype}", lambda a=a, b=b: external_ops.swiglu(a, b),
                          lambda a=a, b=b: external_ops.swiglu_composite(a, b), builtin))
        q = paddle.randn([1, 512, 32, 128]).astype(dtype)
        pos = paddle.arange(512, dtype="int64").unsqueeze(0)
        inv = 1.0 / (10000.0 ** (paddle.arange(0, 128, 2, dtype="float32") / 128.0))
        emb = paddle.concat([pos.astype("float32").unsqueeze(-1) * inv] * 2, axis=-1)
        cos, sin = paddle.cos(emb), paddle.sin(emb)
        cases.append((f"rotary     [1,512,32,128] {dtype}",
                      lambda q=q, c=cos, s=sin: external_ops.apply_rotary(q, c, s),
                      lambda q=q, c=cos, s=sin: external_ops.apply_rotary_composite(q, c, s), None))

    print(f"paddle {paddle.__version__}, device {paddle.device.get_device()}, {os.cpu_count()} CPUs, "
          f"repeat {args.repeat}; ms as median / best; ratio = composite / fused (median)")
    print(f"{'case':36s} {'composite':>15s} {'fused':>15s} {'ratio':>7s} {'max rel diff':>12s}  paddle F.swiglu")
    for name, fused, composite, builtin in cases:
        (tc, bc), (tf, bf) = timed_ms(composite, args.repeat), timed_ms(fused, args.repeat)
        extra = "{:7.2f} / {:6.2f}".format(*timed_ms(builtin, args.repeat)) if builtin else ""
        print(f"{name:36s} {tc:7.2f} / {bc:6.2f} {tf:7.2f} / {bf:6.2f} {tc / tf:6.2f}x "
              f"{rel(fused(), composite()):12.2e}  {extra}")


if __name__ == "__main__":
    main()
