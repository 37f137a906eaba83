// Per-token scalar work of the HypLoRA layer node on the CPU: the same formulas as hyplora_tokens.cu,
// one token at a time (tokens split over threads).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "hyplora_tokens.h"

namespace {

template <typename C>
struct Scalars {
  C u, t, tc, S, c1, v, vs, ash, Rv;
};

template <typename R>
void positive(R raw, R* value, R* slope) {
  const R e = std::exp(raw < R(20) ? raw : R(20));
  *value = (raw > R(20) ? raw : std::log1p(e)) + R(1e-6);
  *slope = raw > R(20) ? R(1) : e / (e + R(1));
}

template <typename C, typename R>
void curvature_scale(const void* rk, const void* rs, C* K, C* s, C* dK, C* ds) {
  R kv, ks, sv, ss;
  positive(static_cast<const R*>(rk)[0], &kv, &ks);
  positive(static_cast<const R*>(rs)[0], &sv, &ss);
  *K = static_cast<C>(kv);
  *s = static_cast<C>(sv);
  *dK = static_cast<C>(ks);
  *ds = static_cast<C>(ss);
}

template <typename C>
Scalars<C> scalars(C sq, C q, C K, C s, C cut) {
  Scalars<C> o;
  o.u = sq / (s * s * K);
  const bool small_u = o.u < cut;
  o.t = std::sqrt(small_u ? C(1) : o.u);
  o.tc = o.t < C(12) ? o.t : C(12);
  o.S = small_u ? C(1) + o.u / C(6) : std::sinh(o.tc) / o.t;
  o.c1 = o.S / s;
  o.v = o.c1 * o.c1 * q / K;
  const bool small_v = o.v < cut;
  o.vs = small_v ? C(1) : o.v;
  const C w = std::sqrt(o.vs);
  o.ash = std::asinh(w);
  o.Rv = small_v ? C(1) - o.v / C(6) : o.ash / w;
  return o;
}

// A result element in the compute dtype (16-bit floats through float, as on the GPU).
template <typename C>
C widen(float v) { return static_cast<C>(v); }
template <typename C>
C widen(double v) { return static_cast<C>(v); }
template <typename C>
C widen(c10::BFloat16 v) { return static_cast<C>(static_cast<float>(v)); }
template <typename C>
C widen(c10::Half v) { return static_cast<C>(static_cast<float>(v)); }

template <typename C, typename R, typename O>
void forward_tokens(const HypForwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale<C, R>(p.rk, p.rs, &K, &s, &dK, &ds);
  const C* x = static_cast<const C*>(p.x);
  const C* y = static_cast<const C*>(p.y);
  const O* res = static_cast<const O*>(p.res);
  O* out = static_cast<O*>(p.out);
  C* sqq = static_cast<C*>(p.sqq);
  at::parallel_for(0, p.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* xr = x + t * p.sx;
      const C* yr = y + t * p.sy;
      C sq = 0, q = 0;
      for (int64_t i = 0; i < p.din; ++i) sq += xr[i] * xr[i];
      for (int64_t i = 0; i < p.dout; ++i) q += yr[i] * yr[i];
      const Scalars<C> z = scalars(sq, q, K, s, static_cast<C>(p.cut));
      const C c = (static_cast<C>(p.scale) * z.c1) * z.Rv;
      for (int64_t i = 0; i < p.dout; ++i) {
        out[t * p.so + i] = static_cast<O>(widen<C>(res[t * p.sr + i]) + c * yr[i]);
      }
      sqq[t] = sq;
      sqq[p.T + t] = q;
    }
  });
}

template <typename C, typename R>
void backward_tokens(const HypBackwardArgs& p) {
  C K, s, dK, ds;
  curvature_scale<C, R>(p.rk, p.rs, &K, &s, &dK, &ds);
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
      const C ga = dot * sc;
      const C sq = sqq[t], q_raw = sqq[p.T + t];
      const C q = q_raw > C(0) ? q_raw : C(0);
      const Scalars<C> z = scalars(sq, q, K, s, ct);
      const C c = (sc * z.c1) * z.Rv;
      const C sh = std::sinh(z.tc);
      C dS = (z.t > C(12) ? -sh : z.tc * std::cosh(z.tc) - sh) / (C(2) * z.t * z.t * z.t);
      if (z.u < ct) dS = C(1) / C(6) + z.u / C(60);
      const C rvs = std::sqrt(z.vs);
      C dR = (C(1) / std::sqrt(C(1) + C(1) / z.vs) - z.ash) * (C(0.5) / (rvs * z.vs));
      if (z.v < ct) dR = C(-1) / C(6) + C(0.15) * z.v;
      const C g_c1 = ga * (z.Rv + C(2) * z.v * dR);
      const C g_u = g_c1 * dS / s;
      const C g_sq = g_u / (s * s * K);
      const C gr = ga * z.c1 * dR;
      const C g_q = q_raw >= C(0) ? gr * (z.c1 * z.c1 / K) : C(0);
      const C g_k = -(gr * z.v + g_u * z.u) / K;
      const C g_s = -(g_c1 * z.S / s + C(2) * g_u * z.u) / s;
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
      war[r] = g_k * dK;
      war[r + 1] = g_s * ds;
      aer[r] = C(1);
      if (gx != nullptr) {
        const C w = C(2) * g_sq;
        const C* xr = x + t * p.sx;
        C* gr_ = gx + t * p.din;
        for (int64_t i = 0; i < p.din; ++i) gr_[i] = w * xr[i];
      }
    }
  });
}

template <typename C, typename R>
const char* forward_by_out(const HypForwardArgs& p) {
  switch (p.out_type) {
    case kFloat32: forward_tokens<C, R, float>(p); return nullptr;
    case kFloat64: forward_tokens<C, R, double>(p); return nullptr;
    case kBFloat16: forward_tokens<C, R, c10::BFloat16>(p); return nullptr;
    case kFloat16: forward_tokens<C, R, c10::Half>(p); return nullptr;
    default: return "unsupported result dtype";
  }
}

}  // namespace

const char* hyplora_forward_cpu(const HypForwardArgs& p) {
  if (p.compute_type == kFloat32) {
    return p.raw_type == kFloat32 ? forward_by_out<float, float>(p) : forward_by_out<float, double>(p);
  }
  if (p.compute_type == kFloat64) {
    return p.raw_type == kFloat32 ? forward_by_out<double, float>(p) : forward_by_out<double, double>(p);
  }
  return "unsupported compute dtype";
}

const char* hyplora_backward_cpu(const HypBackwardArgs& p) {
  if (p.compute_type == kFloat32 && p.raw_type == kFloat32) backward_tokens<float, float>(p);
  else if (p.compute_type == kFloat32) backward_tokens<float, double>(p);
  else if (p.compute_type == kFloat64 && p.raw_type == kFloat32) backward_tokens<double, float>(p);
  else if (p.compute_type == kFloat64) backward_tokens<double, double>(p);
  else return "unsupported compute dtype";
  return nullptr;
}
