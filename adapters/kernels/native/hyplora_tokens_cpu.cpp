// Per-token scalar work of the HypLoRA layer node on the CPU: the same formulas as hyplora_tokens.cu,
// one token at a time (tokens split over threads).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "hyplora_scalars.h"
#include "hyplora_tokens.h"

namespace {

using gp_hyp::curvature_scale;

template <typename C, typename X, typename R>
void forward_tokens(const HypForwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale(static_cast<const R*>(p.rk), static_cast<const R*>(p.rs), &K, &s, &dK, &ds);
  const int r = p.r;
  const X* x = static_cast<const X*>(p.x);
  const C* a = static_cast<const C*>(p.a);
  const C* G = static_cast<const C*>(p.G);
  C* ca = static_cast<C*>(p.ca);
  C* sqq = static_cast<C*>(p.sqq);
  at::parallel_for(0, p.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const X* xr = x + t * p.sx;
      const C* at_ = a + t * r;
      C sq = 0, q = 0;
      for (int64_t i = 0; i < p.din; ++i) {
        const C v = static_cast<C>(xr[i]);  // exact for a 16-bit x
        sq += v * v;
      }
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

template <typename C, typename X, typename R>
void backward_tokens(const HypBackwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale(static_cast<const R*>(p.rk), static_cast<const R*>(p.rs), &K, &s, &dK, &ds);
  const C sc = static_cast<C>(p.scale), ct = static_cast<C>(p.cut);
  const int r = p.r;
  const C* gca = static_cast<const C*>(p.gca);
  const C* a = static_cast<const C*>(p.a);
  const C* G = static_cast<const C*>(p.G);
  const C* sqq = static_cast<const C*>(p.sqq);
  const X* x = static_cast<const X*>(p.x);
  C* da = static_cast<C*>(p.da);
  C* ca = static_cast<C*>(p.ca);
  C* wa = static_cast<C*>(p.wa);
  C* aext = static_cast<C*>(p.aext);
  X* gx = static_cast<X*>(p.gx);
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
        const X* xr = x + t * p.sx;
        X* gr_ = gx + t * p.din;
        for (int64_t i = 0; i < p.din; ++i) gr_[i] = static_cast<X>(w * static_cast<C>(xr[i]));
      }
    }
  });
}

}  // namespace

namespace {

// x's dtype: the compute dtype, or (float32 compute) bfloat16 or float16.
template <typename Args, typename Run>
const char* dispatch(const Args& p, Run&& run) {
  auto with_raw = [&](auto c, auto x) {
    using C = decltype(c);
    using X = decltype(x);
    if (p.raw_type == kFloat32) {
      run.template operator()<C, X, float>(p);
    } else {
      run.template operator()<C, X, double>(p);
    }
    return static_cast<const char*>(nullptr);
  };
  if (p.compute_type == kFloat32) {
    if (p.x_type == kFloat32) return with_raw(float{}, float{});
    if (p.x_type == kBFloat16) return with_raw(float{}, c10::BFloat16{});
    if (p.x_type == kFloat16) return with_raw(float{}, c10::Half{});
    return "unsupported x dtype";
  }
  if (p.compute_type == kFloat64) {
    return p.x_type == kFloat64 ? with_raw(double{}, double{}) : "unsupported x dtype";
  }
  return "unsupported compute dtype";
}

struct Forward {
  template <typename C, typename X, typename R>
  void operator()(const HypForwardArgs& p) const { forward_tokens<C, X, R>(p); }
};

struct Backward {
  template <typename C, typename X, typename R>
  void operator()(const HypBackwardArgs& p) const { backward_tokens<C, X, R>(p); }
};

}  // namespace

const char* hyplora_forward_cpu(const HypForwardArgs& p) { return dispatch(p, Forward{}); }

const char* hyplora_backward_cpu(const HypBackwardArgs& p) { return dispatch(p, Backward{}); }
