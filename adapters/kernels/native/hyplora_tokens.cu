// Per-token scalar work of the HypLoRA layer node (CUDA). See hyplora_tokens.h for the formulas and
// layers.cpp for the products around these kernels. Only CUDA's own headers are included, so this file
// compiles in seconds; the dtype dispatch happens here from the codes passed by layers.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "hyplora_scalars.h"
#include "hyplora_tokens.h"
#include "warp.cuh"

namespace {

using gp_cuda::warp_sum;
using gp_hyp::curvature_scale;

// Four consecutive floats in one 16-byte load or store.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ float sumsq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

// x's elements in the compute dtype C (exact: every 16-bit value is a float32 value), and back to x's
// dtype X for 2(∂L/∂‖x‖²)·x. Explicit conversions: torch's nvcc flags switch the implicit ones off.
template <typename C>
__device__ __forceinline__ C widen(float v) { return v; }
template <typename C>
__device__ __forceinline__ C widen(double v) { return static_cast<C>(v); }
template <typename C>
__device__ __forceinline__ C widen(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename C>
__device__ __forceinline__ C widen(__half v) { return __half2float(v); }
template <typename X, typename C>
__device__ __forceinline__ X narrow_to(C v) {
  if constexpr (std::is_same_v<X, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(v));
  } else if constexpr (std::is_same_v<X, __half>) {
    return __float2half(static_cast<float>(v));
  } else {
    return static_cast<X>(v);
  }
}

// One warp per token (r ≤ 64: lane j holds components j and j + 32), a block's warps on consecutive
// tokens: ‖x‖² (the warp streams over the token's row of x; VEC: four floats per load), q = aᵀGa with G
// in shared memory, c, then c·a and the two norms.
template <typename C, typename X, typename R, bool VEC>
__global__ void forward_kernel(const X* __restrict__ x, const C* __restrict__ a, const C* __restrict__ G,
                               C* __restrict__ ca, C* __restrict__ sqq, const R* __restrict__ rk,
                               const R* __restrict__ rs, double scale, double cut, int64_t T, int r, int64_t din,
                               int64_t sx) {
  extern __shared__ unsigned char smem[];
  C* Gs = reinterpret_cast<C*>(smem);  // r × (r + 1), padded against bank conflicts
  for (int i = threadIdx.x; i < r * r; i += blockDim.x) Gs[(i / r) * (r + 1) + i % r] = G[i];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (t >= T) return;  // the whole warp: every lane of a warp holds the same token
  const X* xr = x + t * sx;
  C acc = 0;
  if constexpr (VEC) {
    for (int64_t i = lane; i < din / 4; i += 32) acc += sumsq4(load4(xr + 4 * i));
  } else {
    for (int64_t i = lane; i < din; i += 32) {
      const C v = widen<C>(xr[i]);
      acc += v * v;
    }
  }
  const C sq = warp_sum(acc);
  const int j0 = lane, j1 = lane + 32;
  const bool in0 = j0 < r, in1 = j1 < r;
  const C a0 = in0 ? a[t * r + j0] : C(0), a1 = in1 ? a[t * r + j1] : C(0);
  C h0 = 0, h1 = 0;  // (aᵀG)_j
  for (int i = 0; i < r; ++i) {
    const C ai = __shfl_sync(0xffffffffu, i < 32 ? a0 : a1, i & 31);
    if (in0) h0 += ai * Gs[i * (r + 1) + j0];
    if (in1) h1 += ai * Gs[i * (r + 1) + j1];
  }
  const C q = warp_sum(h0 * a0 + h1 * a1);
  C K, s, dK, ds;
  curvature_scale(rk, rs, &K, &s, &dK, &ds);
  const C c = gp_hyp::token_scale(sq, q > C(0) ? q : C(0), K, s, static_cast<C>(scale), static_cast<C>(cut));
  if (in0) ca[t * r + j0] = c * a0;
  if (in1) ca[t * r + j1] = c * a1;
  if (lane == 0) {
    sqq[t] = sq;
    sqq[T + t] = q;
  }
}

// One warp per token (r ≤ 64: lane j holds components j and j + 32), a block's warps on consecutive
// tokens. Writes ∂L/∂a, c·a, the rows [g_q·a, g_k·K', g_s·s'] and [a, 1] whose product over tokens gives
// ∂G and the raw-parameter gradients, and, when gx is given, 2(∂L/∂‖x‖²)·x (the whole block streams over
// its tokens' rows of x; VEC: four elements per load).
template <typename C, typename X, typename R, bool VEC>
__global__ void backward_kernel(const C* __restrict__ gca, const C* __restrict__ a, const C* __restrict__ G,
                                const C* __restrict__ sqq, const R* __restrict__ rk, const R* __restrict__ rs,
                                C* __restrict__ da, C* __restrict__ ca, C* __restrict__ wa, C* __restrict__ aext,
                                X* __restrict__ gx, const X* __restrict__ x, double scale, double cut, int64_t T,
                                int r, int64_t din, int64_t sx) {
  extern __shared__ unsigned char smem[];
  C* Gs = reinterpret_cast<C*>(smem);  // r × (r + 1), padded against bank conflicts
  C* wsh = Gs + r * (r + 1);           // 2·∂L/∂‖x‖² of the block's tokens
  for (int i = threadIdx.x; i < r * r; i += blockDim.x) Gs[(i / r) * (r + 1) + i % r] = G[i];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * warps, t = t0 + warp;
  if (t < T) {
    C K, s, dK, ds;
    curvature_scale(rk, rs, &K, &s, &dK, &ds);
    const C sc = static_cast<C>(scale), ct = static_cast<C>(cut);
    const int j0 = lane, j1 = lane + 32;
    const bool in0 = j0 < r, in1 = j1 < r;
    const C a0 = in0 ? a[t * r + j0] : C(0), a1 = in1 ? a[t * r + j1] : C(0);
    const C g0 = in0 ? gca[t * r + j0] : C(0), g1 = in1 ? gca[t * r + j1] : C(0);
    const gp_hyp::TokenGrads<C> tg =
        gp_hyp::token_grads(warp_sum(g0 * a0 + g1 * a1), sqq[t], sqq[T + t], K, s, sc, ct);
    const C c = tg.c, g_q = tg.g_q;
    // (G + Gᵀ) a
    C h0 = 0, h1 = 0;
    for (int i = 0; i < r; ++i) {
      const C ai = __shfl_sync(0xffffffffu, i < 32 ? a0 : a1, i & 31);
      if (in0) h0 += ai * (Gs[i * (r + 1) + j0] + Gs[j0 * (r + 1) + i]);
      if (in1) h1 += ai * (Gs[i * (r + 1) + j1] + Gs[j1 * (r + 1) + i]);
    }
    C* dar = da + t * r;
    C* car = ca + t * r;
    C* war = wa + t * (r + 2);
    C* aer = aext + t * (r + 1);
    if (in0) {
      dar[j0] = c * g0 + g_q * h0;
      car[j0] = a0 * c;
      war[j0] = g_q * a0;
      aer[j0] = a0;
    }
    if (in1) {
      dar[j1] = c * g1 + g_q * h1;
      car[j1] = a1 * c;
      war[j1] = g_q * a1;
      aer[j1] = a1;
    }
    if (lane == 0) {
      war[r] = tg.g_k * dK;
      war[r + 1] = tg.g_s * ds;
      aer[r] = C(1);
      wsh[warp] = C(2) * tg.g_sq;
    }
  }
  if (gx == nullptr) return;
  __syncthreads();
  const int rows = static_cast<int>(T - t0 < warps ? T - t0 : warps);
  for (int k = 0; k < rows; ++k) {
    const C w = wsh[k];
    const X* xr = x + (t0 + k) * sx;
    X* gr_ = gx + (t0 + k) * din;
    if constexpr (VEC) {
      for (int64_t i = threadIdx.x; i < din / 4; i += blockDim.x) {
        const float4 v = load4(xr + 4 * i);
        store4(gr_ + 4 * i, make_float4(w * v.x, w * v.y, w * v.z, w * v.w));
      }
    } else {
      for (int64_t i = threadIdx.x; i < din; i += blockDim.x) gr_[i] = narrow_to<X>(w * widen<C>(xr[i]));
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename C, typename X, typename R>
const char* launch_forward(const HypForwardArgs& p, cudaStream_t stream) {
  const int threads = 256, warps = threads / 32;
  const unsigned blocks = static_cast<unsigned>((p.T + warps - 1) / warps);
  const size_t smem = sizeof(C) * static_cast<size_t>(p.r) * (p.r + 1);
  constexpr bool plain = std::is_same_v<X, float> && std::is_same_v<C, float>;
  const bool vec = plain && p.din % 4 == 0 && p.sx % 4 == 0 && aligned(p.x, 16);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, threads, smem, stream>>>(
        static_cast<const X*>(p.x), static_cast<const C*>(p.a), static_cast<const C*>(p.G),
        static_cast<C*>(p.ca), static_cast<C*>(p.sqq), static_cast<const R*>(p.rk), static_cast<const R*>(p.rs),
        p.scale, p.cut, p.T, p.r, p.din, p.sx);
  };
  if (vec) {
    launch(forward_kernel<C, X, R, plain>);
  } else {
    launch(forward_kernel<C, X, R, false>);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename C, typename X, typename R>
const char* launch_backward(const HypBackwardArgs& p, cudaStream_t stream) {
  const int threads = 256, warps = threads / 32;
  const unsigned blocks = static_cast<unsigned>((p.T + warps - 1) / warps);
  const size_t smem = sizeof(C) * (static_cast<size_t>(p.r) * (p.r + 1) + warps);
  constexpr bool plain = std::is_same_v<X, float> && std::is_same_v<C, float>;
  const bool vec = plain && p.din % 4 == 0 && p.sx % 4 == 0 && aligned(p.x, 16) && aligned(p.gx, 16);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, threads, smem, stream>>>(
        static_cast<const C*>(p.gca), static_cast<const C*>(p.a), static_cast<const C*>(p.G),
        static_cast<const C*>(p.sqq), static_cast<const R*>(p.rk), static_cast<const R*>(p.rs),
        static_cast<C*>(p.da), static_cast<C*>(p.ca), static_cast<C*>(p.wa), static_cast<C*>(p.aext),
        static_cast<X*>(p.gx), static_cast<const X*>(p.x), p.scale, p.cut, p.T, p.r, p.din, p.sx);
  };
  if (vec) {
    launch(backward_kernel<C, X, R, plain>);
  } else {
    launch(backward_kernel<C, X, R, false>);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

namespace {

// x's dtype: the compute dtype, or (float32 compute) bfloat16 or float16.
template <typename Args, typename Launch>
const char* dispatch(const Args& p, Launch&& launch) {
  if (p.compute_type == kFloat32) {
    if (p.x_type == kFloat32) return launch(float{}, float{});
    if (p.x_type == kBFloat16) return launch(float{}, __nv_bfloat16{});
    if (p.x_type == kFloat16) return launch(float{}, __half{});
    return "unsupported x dtype";
  }
  if (p.compute_type == kFloat64) {
    return p.x_type == kFloat64 ? launch(double{}, double{}) : "unsupported x dtype";
  }
  return "unsupported compute dtype";
}

}  // namespace

const char* hyplora_forward_cuda(const HypForwardArgs& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(p, [&](auto c, auto x) {
    using C = decltype(c);
    using X = decltype(x);
    return p.raw_type == kFloat32 ? launch_forward<C, X, float>(p, st) : launch_forward<C, X, double>(p, st);
  });
}

const char* hyplora_backward_cuda(const HypBackwardArgs& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch(p, [&](auto c, auto x) {
    using C = decltype(c);
    using X = decltype(x);
    return p.raw_type == kFloat32 ? launch_backward<C, X, float>(p, st) : launch_backward<C, X, double>(p, st);
  });
}
