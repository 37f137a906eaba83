// Router gates of the HydraLoRA layer node on the CPU (formulas in hydra_gates.h), tokens split over threads.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "hydra_gates.h"

namespace {

template <typename C>
void gates_forward(const GatesForwardArgs& a) {
  const C* h = static_cast<const C*>(a.h);
  C* p = static_cast<C*>(a.p);
  C* z = static_cast<C*>(a.z);
  const int64_t r = a.r, n = a.n;
  at::parallel_for(0, a.T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* hr = h + t * a.sh;
      const C* lg = hr + r;
      C m = -std::numeric_limits<C>::infinity();
      for (int64_t i = 0; i < n; ++i) m = lg[i] > m ? lg[i] : m;
      C s = 0;
      for (int64_t i = 0; i < n; ++i) s += std::exp(lg[i] - m);
      C* pr = p + t * n;
      for (int64_t i = 0; i < n; ++i) pr[i] = std::exp(lg[i] - m) / s;
      C* zr = z + t * n * r;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < r; ++j) zr[i * r + j] = pr[i] * hr[j];
      }
    }
  });
}

template <typename C>
void gates_backward(const GatesBackwardArgs& a) {
  const C* dz = static_cast<const C*>(a.dz);
  const C* h = static_cast<const C*>(a.h);
  const C* p = static_cast<const C*>(a.p);
  const C* gp = static_cast<const C*>(a.gp);
  C* dh = static_cast<C*>(a.dh);
  const int64_t r = a.r, n = a.n;
  at::parallel_for(0, a.T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const C* ar = h + t * a.sh;
      const C* pr = p + t * n;
      const C* dzr = dz != nullptr ? dz + t * n * r : nullptr;
      C* out = dh + t * (r + n);
      for (int64_t j = 0; j < r; ++j) {
        C acc = 0;
        if (dzr != nullptr) {
          for (int64_t i = 0; i < n; ++i) acc += pr[i] * dzr[i * r + j];
        }
        out[j] = acc;
      }
      C dot = 0;
      for (int64_t i = 0; i < n; ++i) {
        C dp = gp != nullptr ? gp[t * n + i] : C(0);
        if (dzr != nullptr) {
          C part = 0;
          for (int64_t j = 0; j < r; ++j) part += dzr[i * r + j] * ar[j];
          dp += part;
        }
        out[r + i] = dp;
        dot += pr[i] * dp;
      }
      for (int64_t i = 0; i < n; ++i) out[r + i] = pr[i] * (out[r + i] - dot);
    }
  });
}

}  // namespace

const char* hydra_gates_forward_cpu(const GatesForwardArgs& a) {
  if (a.compute_type == kFloat32) {
    gates_forward<float>(a);
  } else if (a.compute_type == kFloat64) {
    gates_forward<double>(a);
  } else {
    return "unsupported compute dtype";
  }
  return nullptr;
}

const char* hydra_gates_backward_cpu(const GatesBackwardArgs& a) {
  if (a.compute_type == kFloat32) {
    gates_backward<float>(a);
  } else if (a.compute_type == kFloat64) {
    gates_backward<double>(a);
  } else {
    return "unsupported compute dtype";
  }
  return nullptr;
}
