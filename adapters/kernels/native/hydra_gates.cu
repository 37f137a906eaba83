// Router gates of the HydraLoRA layer node on the GPU (formulas in hydra_gates.h): one warp per token.
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "hydra_gates.h"
#include "warp.cuh"

namespace {

using gp_cuda::warp_max;
using gp_cuda::warp_sum;

template <typename C>
__global__ void gates_forward(const C* __restrict__ h, C* __restrict__ p, C* __restrict__ z, int64_t T, int r,
                              int n, int64_t sh) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= T) return;
  const C* hr = h + t * sh;
  const C* lg = hr + r;
  C m = -static_cast<C>(INFINITY);
  for (int i = lane; i < n; i += 32) m = lg[i] > m ? lg[i] : m;
  m = warp_max(m);
  C s = 0;
  for (int i = lane; i < n; i += 32) s += exp(lg[i] - m);
  s = warp_sum(s);
  for (int i = lane; i < n; i += 32) p[t * n + i] = exp(lg[i] - m) / s;
  C* zr = z + t * n * r;
  for (int k = lane; k < n * r; k += 32) {
    const int i = k / r, j = k - i * r;
    zr[k] = (exp(lg[i] - m) / s) * hr[j];
  }
}

template <typename C>
__global__ void gates_backward(const C* __restrict__ dz, const C* __restrict__ h, const C* __restrict__ p,
                               const C* __restrict__ gp, C* __restrict__ dh, int64_t T, int r, int n, int64_t sh) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= T) return;
  const C* ar = h + t * sh;
  const C* pr = p + t * n;
  const C* dzr = dz != nullptr ? dz + t * n * r : nullptr;
  C* out = dh + t * (r + n);
  for (int j = lane; j < r; j += 32) {
    C acc = 0;
    if (dzr != nullptr) {
      for (int i = 0; i < n; ++i) acc += pr[i] * dzr[i * r + j];
    }
    out[j] = acc;
  }
  for (int i = 0; i < n; ++i) {
    C part = 0;
    if (dzr != nullptr) {
      for (int j = lane; j < r; j += 32) part += dzr[i * r + j] * ar[j];
    }
    part = warp_sum(part);
    if (lane == 0) out[r + i] = part + (gp != nullptr ? gp[t * n + i] : C(0));
  }
  __syncwarp();
  C dot = 0;
  for (int i = lane; i < n; i += 32) dot += pr[i] * out[r + i];
  dot = warp_sum(dot);
  for (int i = lane; i < n; i += 32) out[r + i] = pr[i] * (out[r + i] - dot);
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t T) { return static_cast<unsigned>((T + kThreads / 32 - 1) / (kThreads / 32)); }

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* hydra_gates_forward_cuda(const GatesForwardArgs& a, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int r = static_cast<int>(a.r), n = static_cast<int>(a.n);
  if (a.compute_type == kFloat32) {
    gates_forward<float><<<blocks_for(a.T), kThreads, 0, st>>>(
        static_cast<const float*>(a.h), static_cast<float*>(a.p), static_cast<float*>(a.z), a.T, r, n, a.sh);
  } else if (a.compute_type == kFloat64) {
    gates_forward<double><<<blocks_for(a.T), kThreads, 0, st>>>(
        static_cast<const double*>(a.h), static_cast<double*>(a.p), static_cast<double*>(a.z), a.T, r, n, a.sh);
  } else {
    return "unsupported compute dtype";
  }
  return last_error();
}

const char* hydra_gates_backward_cuda(const GatesBackwardArgs& a, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int r = static_cast<int>(a.r), n = static_cast<int>(a.n);
  if (a.compute_type == kFloat32) {
    gates_backward<float><<<blocks_for(a.T), kThreads, 0, st>>>(
        static_cast<const float*>(a.dz), static_cast<const float*>(a.h), static_cast<const float*>(a.p),
        static_cast<const float*>(a.gp), static_cast<float*>(a.dh), a.T, r, n, a.sh);
  } else if (a.compute_type == kFloat64) {
    gates_backward<double><<<blocks_for(a.T), kThreads, 0, st>>>(
        static_cast<const double*>(a.dz), static_cast<const double*>(a.h), static_cast<const double*>(a.p),
        static_cast<const double*>(a.gp), static_cast<double*>(a.dh), a.T, r, n, a.sh);
  } else {
    return "unsupported compute dtype";
  }
  return last_error();
}
