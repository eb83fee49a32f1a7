// paddlevl fused inference ops: rms_norm, rotary (rotate-half / NeoX), swiglu.
//
// Each op reproduces the composite Paddle path of paddlevl/layers step by step, including where the
// composite rounds to the input dtype, so that fused == composite up to the last bit for fp32 (a few
// ulps where exp and rsqrt are computed differently) and up to one rounding step for bf16/fp16:
//   rms_norm: y = T(x * rsqrt(mean(x^2) + eps)) * w        statistics in fp32
//   rotary:   y = T(x * cos + rotate_half(x) * sin)         computed in fp32, cos/sin fp32
//   swiglu:   y = T(silu(a)) * b                            silu in fp32, rounded to T, then the product
// T(.) rounds an fp32 value to the input dtype (identity for fp32).
// Inference only: no backward is registered.
//
// CPU kernels live here. When paddle is built with CUDA, external_ops/__init__.py also compiles
// paddlevl_ops.cu and defines PADDLEVL_WITH_CUDA; GPU tensors are then sent to the launchers there.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

#define PVL_CHECK(cond, ...) PD_CHECK(cond, "paddlevl_ops: ", __VA_ARGS__)

#ifdef PADDLEVL_WITH_CUDA
std::vector<paddle::Tensor> RmsNormCUDA(const paddle::Tensor& x, const paddle::Tensor& w, float eps);
std::vector<paddle::Tensor> RotaryCUDA(const paddle::Tensor& x, const paddle::Tensor& cos,
                                       const paddle::Tensor& sin);
std::vector<paddle::Tensor> SwigluCUDA(const paddle::Tensor& a, const paddle::Tensor& b);
#endif

namespace {

inline float to_f(float v) { return v; }
inline float to_f(phi::dtype::float16 v) { return static_cast<float>(v); }
// bfloat16 <-> float by hand, bit-identical to phi's CPU conversion (round to nearest even, NaN -> 0x7FFF,
// zeros and infinities keep their sign) but branch-free, so that loops over bfloat16 vectorise too.
inline float to_f(phi::dtype::bfloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }

template <>
inline phi::dtype::bfloat16 from_f<phi::dtype::bfloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  phi::dtype::bfloat16 out;
  out.x = static_cast<uint16_t>(v != v ? 0x7FFFu : rounded);
  return out;
}

// value rounded to T and read back as float (the composite rounds there)
template <typename T>
inline float round_to(float v) { return to_f(from_f<T>(v)); }

// Call f(T{}) with T the C++ type of dtype: float32, bfloat16 or float16 (the dtypes these ops cover).
template <typename F>
void dispatch(paddle::DataType dtype, const char* op, F&& f) {
  switch (dtype) {
    case paddle::DataType::FLOAT32: f(float{}); break;
    case paddle::DataType::BFLOAT16: f(phi::dtype::bfloat16{}); break;
    case paddle::DataType::FLOAT16: f(phi::dtype::float16{}); break;
    default: PD_THROW("paddlevl_ops: ", op, " supports float32, bfloat16 and float16, not ", dtype);
  }
}

void check_cpu_contiguous(const paddle::Tensor& t, const char* name) {
  PVL_CHECK(t.is_cpu(), name, " must be a CPU tensor here");
  PVL_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

// x86-64 with gcc: compile the hot loops twice, for AVX2 and for the baseline, and pick at load time. With
// -ffp-contract=off both clones do the same IEEE operations per element (no FMA, no reordering), so results
// do not depend on the CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PVL_HOT __attribute__((target_clones("avx2", "default")))
#else
#define PVL_HOT
#endif

// exp(x) for float: Cephes-style range reduction (x = m ln2 + r, |r| <= ln2 / 2) and a degree-6 polynomial
// for exp(r), within ~2 ulp of the exact value. Branch-free and libm-free so the loops using it vectorise
// (needs -fno-trapping-math). x is clamped to [-87.3, 89]: below, the result is 0 instead of < 2^-126;
// above, it is +inf as for the exact value. m comes from the 1.5 * 2^23 rounding trick, and 2^m is applied
// as 2 * 2^(m-1) so that m = 128 (x just under log(FLT_MAX)) still gives a finite result.
inline float exp_clamped(float x) {
  x = x > -87.3f ? x : -87.3f;
  x = x < 89.0f ? x : 89.0f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const float k = x * 1.44269504088896341f + shifter;
  const float m = k - shifter;  // round(x / ln2), in [-126, 128]
  float r = x - m * 0.693359375f;  // ln2 in two parts: an exact product, then the small correction
  r = r + m * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t kbits;
  std::memcpy(&kbits, &k, sizeof(kbits));
  const int32_t bits = (kbits - 0x4B400000 + 126) << 23;  // 2^(m-1); m = -126 gives 0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return (y * 2.0f) * scale;
}

// silu(v) = v / (1 + exp(-v)), the composite's formula: -0 for v < -88.7 where exp(-v) overflows, v for
// large positive v.
inline float silu(float v) { return v / (1.0f + exp_clamped(-v)); }

// ---------------------------------------------------------------- rms_norm
template <typename T>
PVL_HOT void rms_norm_kernel(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    // fp32 sum of squares accumulated left to right, the order Paddle's CPU mean uses (a vectorised
    // tree sum would be more accurate but moves the result away from the composite path by ~1e-6)
    float sum = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float v = to_f(xr[i]);
      sum += v * v;
    }
    float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) {
      float n = round_to<T>(to_f(xr[j]) * inv);
      yr[j] = from_f<T>(n * to_f(w[j]));
    }
  }
}

std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x, const paddle::Tensor& w, float eps) {
#ifdef PADDLEVL_WITH_CUDA
  if (x.is_gpu()) return RmsNormCUDA(x, w, eps);
#endif
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(w, "weight");
  PVL_CHECK(x.dtype() == w.dtype(), "rms_norm: x and weight dtypes differ");
  const auto& shape = x.shape();
  PVL_CHECK(!shape.empty(), "rms_norm: x must have at least one dimension");
  const int64_t d = shape.back();
  PVL_CHECK(w.numel() == d, "rms_norm: weight has ", w.numel(), " elements, expected ", d);
  auto y = paddle::empty(shape, x.dtype(), x.place());
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  dispatch(x.dtype(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T>(x.data<T>(), w.data<T>(), y.data<T>(), rows, d, eps);
  });
  return {y};
}

// ---------------------------------------------------------------- rotary
// x [B, L, H, D]; cos, sin fp32 [Bc, L, R] with Bc in {1, B} and R <= D even: the first R features of
// every head rotate (rotate-half within them), the other D - R pass through unchanged.
template <typename T>
PVL_HOT void rotary_kernel(const T* x, const float* cs, const float* sn, T* y, int64_t b, int64_t l, int64_t h,
                   int64_t d, int64_t bc, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t li = 0; li < l; ++li) {
      const int64_t cidx = ((bc == 1 ? 0 : bi) * l + li) * rot;
      const float* c = cs + cidx;
      const float* s = sn + cidx;
      for (int64_t hi = 0; hi < h; ++hi) {
        const int64_t off = ((bi * l + li) * h + hi) * d;
        const T* xr = x + off;
        T* yr = y + off;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_f(xr[i]);
          const float x2 = to_f(xr[i + half]);
          // composite: x * cos + cat(-x2, x1) * sin: two rounded fp32 products, then a rounded sum
          yr[i] = from_f<T>(x1 * c[i] + (-x2) * s[i]);
          yr[i + half] = from_f<T>(x2 * c[i + half] + x1 * s[i + half]);
        }
        for (int64_t i = rot; i < d; ++i) yr[i] = xr[i];
      }
    }
  }
}

std::vector<paddle::Tensor> RotaryForward(const paddle::Tensor& x, const paddle::Tensor& cos,
                                          const paddle::Tensor& sin) {
#ifdef PADDLEVL_WITH_CUDA
  if (x.is_gpu()) return RotaryCUDA(x, cos, sin);
#endif
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(cos, "cos");
  check_cpu_contiguous(sin, "sin");
  PVL_CHECK(cos.dtype() == phi::DataType::FLOAT32 && sin.dtype() == phi::DataType::FLOAT32,
            "rotary: cos and sin must be float32");
  const auto& xs = x.shape();
  const auto& cshape = cos.shape();
  PVL_CHECK(xs.size() == 4, "rotary: x must be [B, L, H, D]");
  PVL_CHECK(cshape.size() == 3 && cshape == sin.shape(), "rotary: cos and sin must both be [B or 1, L, R]");
  const int64_t b = xs[0], l = xs[1], h = xs[2], d = xs[3], rot = cshape[2];
  PVL_CHECK(rot % 2 == 0 && rot <= d, "rotary: rotated size ", rot, " must be even and <= head dim ", d);
  PVL_CHECK((cshape[0] == 1 || cshape[0] == b) && cshape[1] == l,
            "rotary: cos/sin [", cshape[0], ", ", cshape[1], ", R] do not match x [", b, ", ", l, ", H, D]");
  auto y = paddle::empty(xs, x.dtype(), x.place());
  dispatch(x.dtype(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T>(x.data<T>(), cos.data<float>(), sin.data<float>(), y.data<T>(), b, l, h, d, cshape[0], rot);
  });
  return {y};
}

// ---------------------------------------------------------------- swiglu
template <typename T>
PVL_HOT void swiglu_kernel(const T* __restrict a, const T* __restrict b, T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = round_to<T>(silu(to_f(a[i])));
    y[i] = from_f<T>(s * to_f(b[i]));
  }
}

std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& a, const paddle::Tensor& b) {
#ifdef PADDLEVL_WITH_CUDA
  if (a.is_gpu()) return SwigluCUDA(a, b);
#endif
  check_cpu_contiguous(a, "a");
  check_cpu_contiguous(b, "b");
  PVL_CHECK(a.dtype() == b.dtype(), "swiglu: a and b dtypes differ");
  PVL_CHECK(a.shape() == b.shape(), "swiglu: a and b shapes differ");
  auto y = paddle::empty(a.shape(), a.dtype(), a.place());
  dispatch(a.dtype(), "swiglu", [&](auto tag) {
    using T = decltype(tag);
    swiglu_kernel<T>(a.data<T>(), b.data<T>(), y.data<T>(), a.numel());
  });
  return {y};
}

// ---------------------------------------------------------------- shape / dtype inference
std::vector<std::vector<int64_t>> SameAsFirst2(const std::vector<int64_t>& a, const std::vector<int64_t>&) {
  return {a};
}
std::vector<std::vector<int64_t>> SameAsFirst3(const std::vector<int64_t>& a, const std::vector<int64_t>&,
                                               const std::vector<int64_t>&) {
  return {a};
}
std::vector<paddle::DataType> DtypeFirst2(const paddle::DataType& a, const paddle::DataType&) { return {a}; }
std::vector<paddle::DataType> DtypeFirst3(const paddle::DataType& a, const paddle::DataType&,
                                          const paddle::DataType&) {
  return {a};
}

}  // namespace

PD_BUILD_OP(paddlevl_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst2))
    .SetInferDtypeFn(PD_INFER_DTYPE(DtypeFirst2));

PD_BUILD_OP(paddlevl_rotary)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(RotaryForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst3))
    .SetInferDtypeFn(PD_INFER_DTYPE(DtypeFirst3));

PD_BUILD_OP(paddlevl_swiglu)
    .Inputs({"A", "B"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameAsFirst2))
    .SetInferDtypeFn(PD_INFER_DTYPE(DtypeFirst2));
