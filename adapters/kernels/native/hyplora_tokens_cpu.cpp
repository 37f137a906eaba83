// Per-token scalar work of the HypLoRA layer node on the CPU: the same formulas as hyplora_tokens.cu,
// one token at a time (tokens split over threads).
#include <ATen/Parallel.h>

#include <cmath>

#include "hyplora_scalars.h"
#include "hyplora_tokens.h"

namespace {

using gp_hyp::curvature_scale;

template <typename C, typename R>
void forward_tokens(const HypForwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale(static_cast<const R*>(p.rk), static_cast<const R*>(p.rs), &K, &s, &dK, &ds);
  const int r = p.r;
  const C* x = static_cast<const C*>(p.x);
  const C* a = static_cast<const C*>(p.a);
  const C* G = static_cast<const C*>(p.G);
  C* ca = static_cast<C*>(p.ca);
  C* sqq = static_cast<C*>(p.sqq);
  at::parallel_for(0, p.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* xr = x + t * p.sx;
      const C* at_ = a + t * r;
      C sq = 0, q = 0;
      for (int64_t i = 0; i < p.din; ++i) sq += xr[i] * xr[i];
      for (int j = 0; j < r; ++j) {
        C h = 0;  // (aᵀG)_j
        for (int i = 0; i < r; ++i) h += at_[i] * G[i * r + j];
        q += h * at_[j];
      }
      const C c = gp_hyp::token_scale(sq, q > C(0) ? q : C(0), K, s, static_cast<C>(p.scale), static_cast<C>(p.cut));
      for (int j = 0; j < r; ++j) ca[t * r + j] = c * at_[j];
      sqq[t] = sq;
      sqq[p.T + t] = q;
    }
  });
}

template <typename C, typename R>
void backward_tokens(const HypBackwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale(static_cast<const R*>(p.rk), static_cast<const R*>(p.rs), &K, &s, &dK, &ds);
  const C sc = static_cast<C>(p.scale), ct = static_cast<C>(p.cut);
  const int r = p.r;
  const C* gca = static_cast<const C*>(p.gca);
  const C* a = static_cast<const C*>(p.a);
  const C* G = static_cast<const C*>(p.G);
  const C* sqq = static_cast<const C*>(p.sqq);
  const C* x = static_cast<const C*>(p.x);
  C* da = static_cast<C*>(p.da);
  C* ca = static_cast<C*>(p.ca);
  C* wa = static_cast<C*>(p.wa);
  C* aext = static_cast<C*>(p.aext);
  C* gx = static_cast<C*>(p.gx);
  at::parallel_for(0, p.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* at_ = a + t * r;
      const C* gt = gca + t * r;
      C dot = 0;
      for (int j = 0; j < r; ++j) dot += gt[j] * at_[j];
      const gp_hyp::TokenGrads<C> tg = gp_hyp::token_grads(dot, sqq[t], sqq[p.T + t], K, s, sc, ct);
      const C c = tg.c, g_q = tg.g_q;
      C* dar = da + t * r;
      C* car = ca + t * r;
      C* war = wa + t * (r + 2);
      C* aer = aext + t * (r + 1);
      for (int j = 0; j < r; ++j) {
        C h = 0;
        for (int i = 0; i < r; ++i) h += at_[i] * (G[i * r + j] + G[j * r + i]);
        dar[j] = c * gt[j] + g_q * h;
        car[j] = at_[j] * c;
        war[j] = g_q * at_[j];
        aer[j] = at_[j];
      }
      war[r] = tg.g_k * dK;
      war[r + 1] = tg.g_s * ds;
      aer[r] = C(1);
      if (gx != nullptr) {
        const C w = C(2) * tg.g_sq;
        const C* xr = x + t * p.sx;
        C* gr_ = gx + t * p.din;
        for (int64_t i = 0; i < p.din; ++i) gr_[i] = w * xr[i];
      }
    }
  });
}

}  // namespace

const char* hyplora_forward_cpu(const HypForwardArgs& p) {
  if (p.compute_type == kFloat32 && p.raw_type == kFloat32) forward_tokens<float, float>(p);
  else if (p.compute_type == kFloat32) forward_tokens<float, double>(p);
  else if (p.compute_type == kFloat64 && p.raw_type == kFloat32) forward_tokens<double, float>(p);
  else if (p.compute_type == kFloat64) forward_tokens<double, double>(p);
  else return "unsupported compute dtype";
  return nullptr;
}

const char* hyplora_backward_cpu(const HypBackwardArgs& p) {
  if (p.compute_type == kFloat32 && p.raw_type == kFloat32) backward_tokens<float, float>(p);
  else if (p.compute_type == kFloat32) backward_tokens<float, double>(p);
  else if (p.compute_type == kFloat64 && p.raw_type == kFloat32) backward_tokens<double, float>(p);
  else if (p.compute_type == kFloat64) backward_tokens<double, double>(p);
  else return "unsupported compute dtype";
  return nullptr;
}
