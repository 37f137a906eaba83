// The per-token scalar formulas of HypLoRA's layer (hyplora_tokens.h states them), shared by the CUDA
// kernels and the CPU loops so that both compute exactly the same expressions.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define GP_HD __host__ __device__ __forceinline__
#else
#define GP_HD inline
#endif

namespace gp_hyp {

// softplus(raw) + 1e-6 as torch computes it (threshold 20), in the raw parameter's dtype, and its slope.
template <typename R>
GP_HD void positive(R raw, R* value, R* slope) {
  using std::exp;
  using std::log1p;
  const R e = exp(raw < R(20) ? raw : R(20));
  *value = (raw > R(20) ? raw : log1p(e)) + R(1e-6);
  *slope = raw > R(20) ? R(1) : e / (e + R(1));
}

// K, s and their slopes with respect to the raw parameters, in the compute dtype C.
template <typename C, typename R>
GP_HD void curvature_scale(const R* rk, const R* rs, C* K, C* s, C* dK, C* ds) {
  R kv, ks, sv, ss;
  positive(rk[0], &kv, &ks);
  positive(rs[0], &sv, &ss);
  *K = static_cast<C>(kv);
  *s = static_cast<C>(sv);
  *dK = static_cast<C>(ks);
  *ds = static_cast<C>(ss);
}

template <typename C>
struct Scalars {
  C u, t, tc, S, c1, v, vs, ash, Rv;
};

// u, √u, min(√u, 12), S(u), c1, v, v (masked), asinh(√v), R(v), as adapters.hyplora._TokenScale.forward.
template <typename C>
GP_HD Scalars<C> scalars(C sq, C q, C K, C s, C cut) {
  using std::asinh;
  using std::sinh;
  using std::sqrt;
  Scalars<C> o;
  o.u = sq / (s * s * K);
  const bool small_u = o.u < cut;
  o.t = sqrt(small_u ? C(1) : o.u);
  o.tc = o.t < C(12) ? o.t : C(12);
  o.S = small_u ? C(1) + o.u / C(6) : sinh(o.tc) / o.t;
  o.c1 = o.S / s;
  o.v = o.c1 * o.c1 * q / K;
  const bool small_v = o.v < cut;
  o.vs = small_v ? C(1) : o.v;
  const C w = sqrt(o.vs);
  o.ash = asinh(w);
  o.Rv = small_v ? C(1) - o.v / C(6) : o.ash / w;
  return o;
}

// The scalar c of a token.
template <typename C>
GP_HD C token_scale(C sq, C q, C K, C s, C scale, C cut) {
  const Scalars<C> z = scalars(sq, q, K, s, cut);
  return (scale * z.c1) * z.Rv;
}

template <typename C>
struct TokenGrads {
  C c, g_q, g_k, g_s, g_sq;
};

// Backward of one token given dot = Σ_j (g B)_j a_j: c and ∂L/∂q, ∂L/∂K, ∂L/∂s, ∂L/∂‖x‖², with the slopes
// S'(u), R'(v) of adapters.hyplora._sinhc_u_slope, _asinhc_v_slope and the chain rule of _TokenScale.backward.
template <typename C>
GP_HD TokenGrads<C> token_grads(C dot, C sq, C q_raw, C K, C s, C scale, C cut) {
  using std::cosh;
  using std::sinh;
  using std::sqrt;
  const C q = q_raw > C(0) ? q_raw : C(0);
  const Scalars<C> z = scalars(sq, q, K, s, cut);
  const C ga = dot * scale;
  const C sh = sinh(z.tc);
  C dS = (z.t > C(12) ? -sh : z.tc * cosh(z.tc) - sh) / (C(2) * z.t * z.t * z.t);
  if (z.u < cut) dS = C(1) / C(6) + z.u / C(60);
  const C rvs = sqrt(z.vs);
  C dR = (C(1) / sqrt(C(1) + C(1) / z.vs) - z.ash) * (C(0.5) / (rvs * z.vs));
  if (z.v < cut) dR = C(-1) / C(6) + C(0.15) * z.v;
  const C g_c1 = ga * (z.Rv + C(2) * z.v * dR);
  const C g_u = g_c1 * dS / s;
  const C gr = ga * z.c1 * dR;
  TokenGrads<C> o;
  o.c = (scale * z.c1) * z.Rv;
  o.g_sq = g_u / (s * s * K);
  o.g_q = q_raw >= C(0) ? gr * (z.c1 * z.c1 / K) : C(0);
  o.g_k = -(gr * z.v + g_u * z.u) / K;
  o.g_s = -(g_c1 * z.S / s + C(2) * g_u * z.u) / s;
  return o;
}

}  // namespace gp_hyp
