// Per-token scalar work of the HypLoRA layer node (arXiv 2410.04010 Eq. 6–8, METHODS §10), CUDA and CPU.
//
// With a = A x, sq = ‖x‖², q = ‖B a‖² = aᵀ G a (G = BᵀB), K = sp(k̃), s = sp(s̃) (sp(v) = softplus(v) + 1e-6):
//   u = sq/(s²K),  c1 = S(u)/s with S(u) = sinh(min(√u, 12))/√u,  v = c1² q/K,  R(v) = asinh(√v)/√v,
//   c = scale·c1·R(v),  layer output = result + (c·a) Bᵀ.
// Forward: per token sq, q (from the r × r matrix G, so that B a is never formed per token) and c·a; the
// product with Bᵀ, added onto the result, is one matrix product in layers.cpp. Backward, given gca = g B
// (g = ∂L/∂out): per token ∂L/∂a = c·gca + g_q (G + Gᵀ) a, c·a, the rows wa = [g_q·a, g_k·K', g_s·s'] and
// aext = [a, 1] (so that waᵀ aext holds ∂G = Σ g_q a aᵀ and the raw-parameter gradients), and
// optionally 2(∂L/∂sq)·x (the start of ∂L/∂x). Series below `cut` as adapters.hyplora._fused_cutoff.
// q is stored as computed (rounding can make aᵀGa slightly negative where B a ≈ 0); the scalars use
// max(q, 0), and the backward gives such a token no ∂L/∂q, as the Python nodes do.
#pragma once
#include <stdint.h>

#include "dtype_codes.h"

// x (and gx) are in x_type: the compute dtype, or on CUDA a 16-bit dtype with a float32 compute dtype (the
// node under autocast reads x as it came; every 16-bit value is exactly a float32 value).
struct HypForwardArgs {
  int compute_type, raw_type, x_type;
  const void* x;  // (T, din) x_type, row stride sx
  const void* a;  // (T, r) contiguous
  const void* G;  // (r, r) contiguous
  void* ca;       // (T, r): c·a
  void* sqq;      // (2T) compute dtype: ‖x‖² then aᵀGa
  const void* rk;  // raw curvature, one element
  const void* rs;  // raw scale, one element
  double scale, cut;
  int64_t T;
  int r;
  int64_t din, sx;
};

struct HypBackwardArgs {
  int compute_type, raw_type, x_type;
  const void* gca;  // (T, r) contiguous
  const void* a;    // (T, r) contiguous
  const void* G;    // (r, r) contiguous
  const void* sqq;  // (2T)
  const void* rk;
  const void* rs;
  void* da;    // (T, r)
  void* ca;    // (T, r)
  void* wa;    // (T, r + 2)
  void* aext;  // (T, r + 1)
  void* gx;    // (T, din) contiguous x_type, or null
  const void* x;  // (T, din) x_type, row stride sx
  double scale, cut;
  int64_t T;
  int r;
  int64_t din, sx;
};

// Each returns null on success, else a message.
const char* hyplora_forward_cuda(const HypForwardArgs& p, void* stream);
const char* hyplora_backward_cuda(const HypBackwardArgs& p, void* stream);
const char* hyplora_forward_cpu(const HypForwardArgs& p);
const char* hyplora_backward_cpu(const HypBackwardArgs& p);
