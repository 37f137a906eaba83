// Per-token scalar work of the HypLoRA layer node (CUDA). See hyplora_tokens.h for the formulas and
// layers.cpp for the products around these kernels. Only CUDA's own headers are included, so this file
// compiles in seconds; the dtype dispatch happens here from the codes passed by layers.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "hyplora_scalars.h"
#include "hyplora_tokens.h"
#include "warp.cuh"

namespace {

using gp_cuda::block_sum;
using gp_cuda::warp_sum;
using gp_hyp::curvature_scale;

__device__ __forceinline__ float load_as(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_as(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_as(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_as(const __half* p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store_as(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_as(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
__device__ __forceinline__ void store_as(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void store_as(double* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, int64_t i, double v) { p[i] = __double2bfloat16(v); }
__device__ __forceinline__ void store_as(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_as(__half* p, int64_t i, double v) { p[i] = __double2half(v); }

// Four consecutive elements as float4 (16-byte loads of float, 8-byte of the 16-bit types).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const unsigned*>(&a);
  u.y = *reinterpret_cast<const unsigned*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(__half* p, float4 v) {
  const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const unsigned*>(&a);
  u.y = *reinterpret_cast<const unsigned*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ float sumsq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

// Squared norm of one row: VEC reads four floats per load.
template <typename C, bool VEC>
__device__ __forceinline__ C row_sumsq(const C* row, int64_t n) {
  C acc = 0;
  if constexpr (VEC) {
    for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x) acc += sumsq4(load4(row + 4 * i));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += row[i] * row[i];
  }
  return acc;
}

// One block per token: ‖x‖², q = ‖y‖², c, then out = result + c·y (in result's dtype; out may be result).
// VEC: float compute, every row length and stride a multiple of 4 and the rows aligned, so four elements
// move per load.
template <typename C, typename R, typename O, bool VEC>
__global__ void forward_kernel(const C* __restrict__ x, const C* __restrict__ y, const O* res, O* out,
                               C* __restrict__ sqq, const R* __restrict__ rk, const R* __restrict__ rs,
                               double scale, double cut, int64_t T, int64_t din, int64_t dout, int64_t sx,
                               int64_t sy, int64_t sr, int64_t so) {
  __shared__ C scratch[32];
  const int64_t row = blockIdx.x;
  const C* xr = x + row * sx;
  const C* yr = y + row * sy;
  const C sq = block_sum(row_sumsq<C, VEC>(xr, din), scratch);
  const C q = block_sum(row_sumsq<C, VEC>(yr, dout), scratch);
  C K, s, dK, ds;
  curvature_scale(rk, rs, &K, &s, &dK, &ds);
  const C c = gp_hyp::token_scale(sq, q, K, s, static_cast<C>(scale), static_cast<C>(cut));
  if constexpr (VEC) {
    for (int64_t i = threadIdx.x; i < dout / 4; i += blockDim.x) {
      const float4 yv = load4(yr + 4 * i), rv = load4(res + row * sr + 4 * i);
      store4(out + row * so + 4 * i,
             make_float4(rv.x + c * yv.x, rv.y + c * yv.y, rv.z + c * yv.z, rv.w + c * yv.w));
    }
  } else {
    for (int64_t i = threadIdx.x; i < dout; i += blockDim.x) {
      store_as(out, row * so + i, static_cast<C>(load_as(res, row * sr + i)) + c * yr[i]);
    }
  }
  if (threadIdx.x == 0) {
    sqq[row] = sq;
    sqq[T + row] = q;
  }
}

// One warp per token (r ≤ 64: lane j holds components j and j + 32), a block's warps on consecutive
// tokens. Writes ∂L/∂a, c·a, the rows [g_q·a, g_k·K', g_s·s'] and [a, 1] whose product over tokens gives
// ∂G and the raw-parameter gradients, and, when gx is given, 2(∂L/∂‖x‖²)·x (the whole block streams over
// its tokens' rows of x; VEC: four elements per load).
template <typename C, typename R, bool VEC>
__global__ void backward_kernel(const C* __restrict__ gca, const C* __restrict__ a, const C* __restrict__ G,
                                const C* __restrict__ sqq, const R* __restrict__ rk, const R* __restrict__ rs,
                                C* __restrict__ da, C* __restrict__ ca, C* __restrict__ wa, C* __restrict__ aext,
                                C* __restrict__ gx, const C* __restrict__ x, double scale, double cut, int64_t T,
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
    const C* xr = x + (t0 + k) * sx;
    C* gr_ = gx + (t0 + k) * din;
    if constexpr (VEC) {
      for (int64_t i = threadIdx.x; i < din / 4; i += blockDim.x) {
        const float4 v = load4(xr + 4 * i);
        store4(gr_ + 4 * i, make_float4(w * v.x, w * v.y, w * v.z, w * v.w));
      }
    } else {
      for (int64_t i = threadIdx.x; i < din; i += blockDim.x) gr_[i] = w * xr[i];
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename C, typename R, typename O>
const char* launch_forward(const HypForwardArgs& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.T);
  const bool vec = sizeof(C) == 4 && sizeof(O) <= 4 && p.din % 4 == 0 && p.dout % 4 == 0 && p.sx % 4 == 0 && p.sy % 4 == 0 &&
                   p.sr % 4 == 0 && p.so % 4 == 0 && aligned(p.x, 16) && aligned(p.y, 16) &&
                   aligned(p.res, 4 * sizeof(O)) && aligned(p.out, 4 * sizeof(O));
  auto launch = [&](auto kernel) {
    kernel<<<blocks, 256, 0, stream>>>(
        static_cast<const C*>(p.x), static_cast<const C*>(p.y), static_cast<const O*>(p.res),
        static_cast<O*>(p.out), static_cast<C*>(p.sqq), static_cast<const R*>(p.rk), static_cast<const R*>(p.rs),
        p.scale, p.cut, p.T, p.din, p.dout, p.sx, p.sy, p.sr, p.so);
  };
  if (vec) {
    launch(forward_kernel<C, R, O, sizeof(C) == 4 && sizeof(O) <= 4>);
  } else {
    launch(forward_kernel<C, R, O, false>);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename C, typename R>
const char* launch_backward(const HypBackwardArgs& p, cudaStream_t stream) {
  const int threads = 256, warps = threads / 32;
  const unsigned blocks = static_cast<unsigned>((p.T + warps - 1) / warps);
  const size_t smem = sizeof(C) * (static_cast<size_t>(p.r) * (p.r + 1) + warps);
  const bool vec = sizeof(C) == 4 && p.din % 4 == 0 && p.sx % 4 == 0 && aligned(p.x, 16) && aligned(p.gx, 16);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, threads, smem, stream>>>(
        static_cast<const C*>(p.gca), static_cast<const C*>(p.a), static_cast<const C*>(p.G),
        static_cast<const C*>(p.sqq), static_cast<const R*>(p.rk), static_cast<const R*>(p.rs),
        static_cast<C*>(p.da), static_cast<C*>(p.ca), static_cast<C*>(p.wa), static_cast<C*>(p.aext),
        static_cast<C*>(p.gx), static_cast<const C*>(p.x), p.scale, p.cut, p.T, p.r, p.din, p.sx);
  };
  if (vec) {
    launch(backward_kernel<C, R, sizeof(C) == 4>);
  } else {
    launch(backward_kernel<C, R, false>);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename C, typename R>
const char* forward_by_out(const HypForwardArgs& p, cudaStream_t stream) {
  switch (p.out_type) {
    case kFloat32: return launch_forward<C, R, float>(p, stream);
    case kFloat64: return launch_forward<C, R, double>(p, stream);
    case kBFloat16: return launch_forward<C, R, __nv_bfloat16>(p, stream);
    case kFloat16: return launch_forward<C, R, __half>(p, stream);
    default: return "unsupported result dtype";
  }
}

}  // namespace

const char* hyplora_forward_cuda(const HypForwardArgs& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.compute_type == kFloat32) {
    return p.raw_type == kFloat32 ? forward_by_out<float, float>(p, st) : forward_by_out<float, double>(p, st);
  }
  if (p.compute_type == kFloat64) {
    return p.raw_type == kFloat32 ? forward_by_out<double, float>(p, st) : forward_by_out<double, double>(p, st);
  }
  return "unsupported compute dtype";
}

const char* hyplora_backward_cuda(const HypBackwardArgs& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.compute_type == kFloat32) {
    return p.raw_type == kFloat32 ? launch_backward<float, float>(p, st) : launch_backward<float, double>(p, st);
  }
  if (p.compute_type == kFloat64) {
    return p.raw_type == kFloat32 ? launch_backward<double, float>(p, st) : launch_backward<double, double>(p, st);
  }
  return "unsupported compute dtype";
}
