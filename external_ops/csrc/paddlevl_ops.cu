// paddlevl fused inference ops: CUDA launchers for rms_norm, rotary and swiglu.
//
// UNTESTED: this project's machines have no CUDA build of Paddle, so this file has never been compiled or
// run. It is only built when paddle.is_compiled_with_cuda() is true (external_ops/__init__.py then adds
// it to the sources and defines PADDLEVL_WITH_CUDA for paddlevl_ops.cc, which forwards GPU tensors here).
// The kernels follow the CPU ones step by step (fp32 math, the same rounding points); if this file fails
// to build, the Python wrappers fall back to the composite Paddle path with a one-line warning.

#include <vector>

#include "paddle/extension.h"

namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// one block per row; fp32 sum of squares reduced in shared memory
template <typename T>
__global__ void rms_norm_kernel(const T* x, const T* w, T* y, int64_t d, float eps) {
  extern __shared__ float partial[];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_f(xr[i]);
    acc += v * v;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float inv = rsqrtf(partial[0] / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float n = round_to<T>(to_f(xr[i]) * inv);
    yr[i] = static_cast<T>(n * to_f(w[i]));
  }
}

// one thread per (b, l, h, i < R/2) pair, plus a copy of the unrotated tail
template <typename T>
__global__ void rotary_kernel(const T* x, const float* cs, const float* sn, T* y, int64_t b, int64_t l,
                              int64_t h, int64_t d, int64_t bc, int64_t rot) {
  const int64_t half = rot / 2;
  const int64_t per_head = half + (d - rot);
  const int64_t total = b * l * h * per_head;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = k % per_head;
    const int64_t head = k / per_head;  // (bi * l + li) * h + hi
    const int64_t li = (head / h) % l;
    const int64_t bi = head / (h * l);
    const T* xr = x + head * d;
    T* yr = y + head * d;
    if (j < half) {
      const int64_t cidx = ((bc == 1 ? 0 : bi) * l + li) * rot;
      const float x1 = to_f(xr[j]);
      const float x2 = to_f(xr[j + half]);
      yr[j] = static_cast<T>(__fadd_rn(__fmul_rn(x1, cs[cidx + j]), __fmul_rn(-x2, sn[cidx + j])));
      yr[j + half] = static_cast<T>(
          __fadd_rn(__fmul_rn(x2, cs[cidx + j + half]), __fmul_rn(x1, sn[cidx + j + half])));
    } else {
      const int64_t i = rot + (j - half);
      yr[i] = xr[i];
    }
  }
}

template <typename T>
__global__ void swiglu_kernel(const T* a, const T* b, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_f(a[i]);
    const float s = round_to<T>(v / (1.0f + expf(-v)));
    y[i] = static_cast<T>(s * to_f(b[i]));
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

std::vector<paddle::Tensor> RmsNormCUDA(const paddle::Tensor& x, const paddle::Tensor& w, float eps) {
  PD_CHECK(x.dtype() == w.dtype(), "paddlevl_ops: rms_norm: x and weight dtypes differ");
  const int64_t d = x.shape().back();
  PD_CHECK(w.numel() == d, "paddlevl_ops: rms_norm: weight size does not match the last dim of x");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  if (rows == 0) return {y};
  const int threads = 256;
  PD_DISPATCH_FLOATING_AND_HALF_TYPES(x.type(), "paddlevl_rms_norm_cuda", ([&] {
    rms_norm_kernel<data_t><<<rows, threads, threads * sizeof(float), x.stream()>>>(
        x.data<data_t>(), w.data<data_t>(), y.data<data_t>(), d, eps);
  }));
  return {y};
}

std::vector<paddle::Tensor> RotaryCUDA(const paddle::Tensor& x, const paddle::Tensor& cos,
                                       const paddle::Tensor& sin) {
  PD_CHECK(cos.dtype() == phi::DataType::FLOAT32 && sin.dtype() == phi::DataType::FLOAT32,
           "paddlevl_ops: rotary: cos and sin must be float32");
  const auto& xs = x.shape();
  const auto& cshape = cos.shape();
  PD_CHECK(xs.size() == 4 && cshape.size() == 3, "paddlevl_ops: rotary: x [B, L, H, D], cos/sin [B or 1, L, R]");
  const int64_t b = xs[0], l = xs[1], h = xs[2], d = xs[3], rot = cshape[2];
  PD_CHECK(rot % 2 == 0 && rot <= d && (cshape[0] == 1 || cshape[0] == b) && cshape[1] == l,
           "paddlevl_ops: rotary: cos/sin shape does not match x");
  auto y = paddle::empty(xs, x.dtype(), x.place());
  const int64_t total = b * l * h * (rot / 2 + d - rot);
  if (total == 0) return {y};
  const int threads = 256;
  PD_DISPATCH_FLOATING_AND_HALF_TYPES(x.type(), "paddlevl_rotary_cuda", ([&] {
    rotary_kernel<data_t><<<grid_for(total, threads), threads, 0, x.stream()>>>(
        x.data<data_t>(), cos.data<float>(), sin.data<float>(), y.data<data_t>(), b, l, h, d, cshape[0], rot);
  }));
  return {y};
}

std::vector<paddle::Tensor> SwigluCUDA(const paddle::Tensor& a, const paddle::Tensor& b) {
  PD_CHECK(a.dtype() == b.dtype() && a.shape() == b.shape(), "paddlevl_ops: swiglu: a and b differ");
  auto y = paddle::empty(a.shape(), a.dtype(), a.place());
  const int64_t n = a.numel();
  if (n == 0) return {y};
  const int threads = 256;
  PD_DISPATCH_FLOATING_AND_HALF_TYPES(a.type(), "paddlevl_swiglu_cuda", ([&] {
    swiglu_kernel<data_t><<<grid_for(n, threads), threads, 0, a.stream()>>>(
        a.data<data_t>(), b.data<data_t>(), y.data<data_t>(), n);
  }));
  return {y};
}
