// The adapter layers' training nodes in C++: one autograd node per adapted linear layer whose backward
// runs without the Python interpreter (a Python autograd.Function pays the interpreter for its backward and
// for every op it issues, which bounds a training step when the GPU work per layer is small).
//
// hyplora_linear: result + scale·Δ(x) of HypLoRA (consistent map, adapters.kernels.hyplora_fused), the
//   per-token scalar work in hyplora_tokens.{cu,cpp}; hyplora_layer: the same with the frozen base
//   product x Wᵀ (+ b) formed inside the node.
// hydra_linear:   x Wᵀ (+ b) + s·(g ⊗ a) Bᵀ and the gates g of HydraLoRA (adapters.hydralora._HydraLinearFn),
//   the gates' softmax and outer product in hydra_gates.{cu,cpp}.
#include <torch/extension.h>
#include <torch/version.h>
#include <ATen/autocast_mode.h>

#include <array>
#include <atomic>
#include <utility>

#ifdef GEOPROBE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "hydra_gates.h"
#include "hyplora_tokens.h"

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// Autocast off inside the nodes: the adapter products run in the adapter weights' dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "geoprobe native: unsupported dtype ", t);
  }
}

#ifdef GEOPROBE_CUDA
#define GP_CUDA_KERNEL(f) (f)
#else
#define GP_CUDA_KERNEL(f) nullptr
#endif

template <typename T>
struct NotDeduced {
  using type = T;
};

// Runs a kernel launcher on like's device (CUDA: the current stream) and raises with its message.
template <typename Args>
void run_kernel(const char* what, const Args& args, const at::Tensor& like,
                typename NotDeduced<const char* (*)(const Args&, void*)>::type cuda,
                typename NotDeduced<const char* (*)(const Args&)>::type cpu) {
  const char* err = nullptr;
  if (like.is_cuda()) {
#ifdef GEOPROBE_CUDA
    const c10::cuda::CUDAGuard device(like.device());  // launch on like's GPU, whichever is current
    err = cuda(args, c10::cuda::getCurrentCUDAStream(like.get_device()).stream());
#else
    err = "built without CUDA";
#endif
  } else {
    err = cpu(args);
  }
  TORCH_CHECK(err == nullptr, what, ": ", err);
}

// A node behind shared_ptr (older libtorch) or intrusive_ptr (newer), whichever Edge holds.
template <typename P, typename N = torch::autograd::Error>
P make_node(const char* msg) {
  if constexpr (std::is_same_v<P, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(msg);
  } else {
    return c10::make_intrusive<N>(msg);
  }
}

// As Python's @once_differentiable: under create_graph=True the gradients are returned behind a node that
// raises if they are differentiated again (the kernels' own derivatives are not formed).
variable_list once_differentiable(variable_list out, bool grad_mode) {
  if (!grad_mode) return out;
  using NodePtr = decltype(std::declval<torch::autograd::Edge>().function);
  const NodePtr node = make_node<NodePtr>(
      "trying to differentiate twice a function that was marked with @once_differentiable");
  for (auto& v : out) {
    if (v.defined()) {
      v = v.detach();
      torch::autograd::set_history(v, node);
    }
  }
  return out;
}

// A C++ autograd function whose backward (T::backward_impl) runs without grad mode and autocast and is
// differentiable once, as the Python nodes' @once_differentiable backward.
template <typename T>
struct OnceDifferentiable : public torch::autograd::Function<T> {
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool grad_mode = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    NoAutocast no_autocast;
    return once_differentiable(T::backward_impl(ctx, grads), grad_mode);
  }
};

// The gates kernels serve float32/float64 adapters; other dtypes take the ATen ops.
bool gates_kernels(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

at::Tensor as_grad(const at::Tensor& value, const at::Tensor& like) {
  at::Tensor g = value.scalar_type() == like.scalar_type() ? value : value.to(like.scalar_type());
  return g.reshape(like.sizes());
}

// --------------------------------------------------------------------------- HypLoRA
// The adapter's share of the layer, shared by the two nodes below.
struct HypSaved {
  at::Tensor xf, a, sqq;  // x (T, din) in the adapter dtype, or 16-bit as it came (narrow_x), A x, and ‖x‖²
                          // then aᵀGa per token
};

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// mat1 mat2 with a float32/float64 result from 16-bit operands: cuBLAS accumulates in float32 and writes the
// result type (aten::mm.dtype, CUDA, torch ≥ 2.8); elsewhere, or where that overload refuses, the operands
// are widened first (the same products, one copy more).
at::Tensor mm_into(const at::Tensor& mat1, const at::Tensor& mat2, at::ScalarType result) {
#if defined(GEOPROBE_CUDA) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
  static std::atomic<bool> refused{false};
  if (mat1.is_cuda() && result == at::kFloat && !refused.load(std::memory_order_relaxed)) {
    try {
      return at::mm(mat1, mat2, result);
    } catch (const c10::Error&) {
      refused.store(true, std::memory_order_relaxed);
    }
  }
#endif
  return at::mm(mat1.to(result), mat2.to(result));
}

// m (float32) as 16-bit parts written into the views given (each m's shape, in one 16-bit dtype): hi = m
// rounded, mid = the remainder rounded, lo = what is left rounded; together float32's 24 significant bits
// (bfloat16: 8 each), so a product of a 16-bit operand with the parts, float32 accumulation, equals the
// float32 product to float32 rounding. Written in place into slices of one buffer (no concatenation), a
// few elementwise launches; `lo` undefined: hi and mid only.
void split_into(const at::Tensor& m, const at::Tensor& hi, const at::Tensor& mid, const at::Tensor& lo) {
  hi.copy_(m);
  at::Tensor rest = m - hi;  // m's dtype (type promotion): the exact remainder
  mid.copy_(rest);
  if (lo.defined()) lo.copy_(rest.sub_(mid));
}

// x Aᵀ for a 16-bit x (T, din) and a float32 A (r, din), float32 result: x against A's three parts stacked
// (3r, din) in one product (float32 accumulation), the three (T, r) blocks summed. No float32 copy of x.
at::Tensor x_times_at(const at::Tensor& x, const at::Tensor& A) {
  const int64_t r = A.size(0);
  const at::Tensor w = at::empty({3 * r, A.size(1)}, A.options().dtype(x.scalar_type()));
  split_into(A, w.narrow(0, 0, r), w.narrow(0, r, r), w.narrow(0, 2 * r, r));
  return mm_into(x, w.t(), A.scalar_type()).reshape({x.size(0), 3, r}).sum(1);
}

// The adapter's products with a 16-bit x in backward, for a float32 da (T, r) and A (r, din): ∂A = daᵀ x
// (float32, (r, din)) against da's three parts, and, where `gx` is defined, gx += da A in gx's 16-bit dtype
// (one product onto gx, float32 accumulation, one rounding) as da_mid A_hi + da_hi A_mid + da_hi A_hi (about
// 16 significant bits before the 16-bit result's 8). da's parts sit in one (T, 4r) buffer [lo | mid | hi |
// hi] and A's in one (3r, din) buffer [hi; mid; hi], so each product reads a slice: [lo | mid | hi] for ∂A,
// [mid | hi | hi] against [hi; mid; hi] for da A.
at::Tensor products_with_x(const at::Tensor& da, const at::Tensor& A, const at::Tensor& x, at::Tensor& gx,
                           bool need_A) {
  const int64_t T = da.size(0), r = da.size(1);
  const at::Tensor d = at::empty({T, 4 * r}, da.options().dtype(x.scalar_type()));
  split_into(da, d.narrow(1, 2 * r, r), d.narrow(1, r, r), d.narrow(1, 0, r));
  if (gx.defined()) {
    d.narrow(1, 3 * r, r).copy_(d.narrow(1, 2 * r, r));
    const at::Tensor w = at::empty({3 * r, A.size(1)}, A.options().dtype(x.scalar_type()));
    split_into(A, w.narrow(0, 0, r), w.narrow(0, r, r), at::Tensor());
    w.narrow(0, 2 * r, r).copy_(w.narrow(0, 0, r));
    gx.addmm_(d.narrow(1, r, 3 * r), w);
  }
  if (!need_A) return at::Tensor();
  return mm_into(d.narrow(1, 0, 3 * r).t(), x, da.scalar_type()).reshape({3, r, x.size(1)}).sum(0);
}

// Whether the caller runs under autocast on x's device: only then do the adapter's products with a 16-bit
// operand run in that dtype, as PEFT LoRA's do under autocast. Outside autocast PEFT computes the update in
// the adapter dtype (x cast to it) and rounds once when adding it to the base output; so does this node.
bool under_autocast(const at::Tensor& x) { return at::autocast::is_autocast_enabled(x.device().type()); }

// a = x Aᵀ, G = BᵀB, the per-token kernel (‖x‖², q = aᵀGa, c·a), then out = res + (c·a) Bᵀ in res's dtype:
// in place when `in_place` (res is the node's own base product), else into a new tensor. With a 16-bit
// result under autocast (`narrow`) the product with Bᵀ runs in that dtype (float32 accumulation, as PEFT
// LoRA's under autocast), so the update never takes a (T, dout) float32 tensor; otherwise it runs in the
// adapter dtype and is added to res in it, rounded once to res's dtype.
std::pair<HypSaved, at::Tensor> hyp_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                            const at::Tensor& raw_k, const at::Tensor& raw_s, const at::Tensor& res,
                                            bool in_place, double scale, double cut, bool narrow) {
  const auto dt = A.scalar_type();
  const int64_t din = A.size(1), r = A.size(0);
  at::Tensor xf = x.reshape({-1, din});
  // under autocast a 16-bit x stays as it came (narrow_x): a = x Aᵀ against A's three 16-bit parts, and the
  // kernel reads x itself; the values equal the float32 path's to float32 rounding
  const bool narrow_x = narrow && low_precision(xf.scalar_type()) && dt == at::kFloat;
  if (!narrow_x && xf.scalar_type() != dt) xf = xf.to(dt);
  xf = xf.contiguous();
  const at::Tensor a = narrow_x ? x_times_at(xf, A) : at::mm(xf, A.t());
  const at::Tensor G = at::mm(B.t(), B);
  const int64_t T = xf.size(0);
  const auto opts = a.options();
  at::Tensor ca = at::empty({T, r}, opts);
  at::Tensor sqq = at::empty({2 * T}, opts);
  HypForwardArgs p{dtype_code(dt), dtype_code(raw_k.scalar_type()), dtype_code(xf.scalar_type()), xf.data_ptr(),
                   a.data_ptr(), G.data_ptr(), ca.data_ptr(), sqq.data_ptr(), raw_k.data_ptr(), raw_s.data_ptr(),
                   scale, cut, T, static_cast<int>(r), din, xf.stride(0)};
  run_kernel("HypLoRA forward kernel", p, a, GP_CUDA_KERNEL(hyplora_forward_cuda), hyplora_forward_cpu);
  const auto ot = res.scalar_type();
  if (ot != dt && !narrow) {
    const at::Tensor wide = at::addmm(res.to(dt), ca, B.t());
    return {HypSaved{xf, a, sqq}, in_place ? res.copy_(wide) : wide.to(ot)};
  }
  const at::Tensor cao = ot == dt ? ca : ca.to(ot);
  const at::Tensor bo = ot == dt ? B : B.to(ot);
  at::Tensor out = in_place ? res.addmm_(cao, bo.t()) : at::addmm(res, cao, bo.t());
  return {HypSaved{xf, a, sqq}, out};
}

struct HypGrads {
  at::Tensor x, A, B, k, s;  // x's in the adapter dtype, (T, din)
};

// g B for a 16-bit g and a float32 B without widening g: B = B_hi + B_lo with both parts in g's dtype
// (B_hi = B rounded, B_lo = the remainder rounded; together about 16 significant bits, against 8 for B_hi
// alone), one product g [B_hi | B_lo] of width 2r with float32 results, and the halves added. B rounded to
// 16 bits alone moves ∂L/∂K and ∂L/∂s, sums over every element with cancellation, by several percent.
at::Tensor g_times_b(const at::Tensor& g, const at::Tensor& B) {
  const int64_t r = B.size(1);
  const at::Tensor both = at::empty({B.size(0), 2 * r}, B.options().dtype(g.scalar_type()));
  split_into(B, both.narrow(1, 0, r), both.narrow(1, r, r), at::Tensor());
  return mm_into(g, both, B.scalar_type()).reshape({g.size(0), 2, r}).sum(1);
}

// Gradients of the adapter's share given g = ∂L/∂out (any dtype and shape with T rows). A 16-bit g on
// CUDA, when the forward ran under autocast (`narrow`), meets B (split, g_times_b) and c·a in its own dtype
// with float32 results (mm_into), instead of being copied to float32 whole; otherwise g is widened first.
HypGrads hyp_backward(const at::Tensor& g, const HypSaved& sv, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& raw_k, const at::Tensor& raw_s, double scale, double cut, bool narrow,
                      bool need_x, bool need_A, bool need_B, bool need_k, bool need_s) {
  const auto dt = A.scalar_type();
  const at::Tensor& xf = sv.xf;  // 16-bit where the forward ran narrow_x
  const bool narrow_x = xf.scalar_type() != dt;
  const at::Tensor& a = sv.a;
  const int64_t T = a.size(0), r = a.size(1), din = A.size(1);
  TORCH_CHECK(a.is_contiguous() && xf.stride(1) == 1, "HypLoRA layer: saved tensors lost their layout");
  at::Tensor gf = g.reshape({T, -1});
  const bool narrow_g = narrow && gf.is_cuda() && dt == at::kFloat && low_precision(gf.scalar_type());
  if (!narrow_g && gf.scalar_type() != dt) gf = gf.to(dt);
  const at::Tensor gca = narrow_g ? g_times_b(gf, B) : at::mm(gf, B);
  const at::Tensor G = at::mm(B.t(), B);
  const auto opts = a.options();
  at::Tensor da = at::empty({T, r}, opts), ca = at::empty({T, r}, opts);
  at::Tensor wa = at::empty({T, r + 2}, opts), aext = at::empty({T, r + 1}, opts);
  HypGrads out;
  if (need_x) out.x = at::empty({T, din}, xf.options());  // narrow_x: x's 16-bit dtype
  HypBackwardArgs p{dtype_code(dt), dtype_code(raw_k.scalar_type()), dtype_code(xf.scalar_type()), gca.data_ptr(),
                    a.data_ptr(),
                    G.data_ptr(), sv.sqq.data_ptr(), raw_k.data_ptr(), raw_s.data_ptr(), da.data_ptr(),
                    ca.data_ptr(), wa.data_ptr(), aext.data_ptr(), need_x ? out.x.data_ptr() : nullptr,
                    xf.data_ptr(), scale, cut, T, static_cast<int>(r), din, xf.stride(0)};
  run_kernel("HypLoRA backward kernel", p, a, GP_CUDA_KERNEL(hyplora_backward_cuda), hyplora_backward_cpu);
  if (narrow_x) {
    if (need_x || need_A) out.A = products_with_x(da, A, xf, out.x, need_A);
  } else {
    if (need_x) out.x.addmm_(da, A);
    if (need_A) out.A = at::mm(da.t(), xf);
  }
  if (need_B || need_k || need_s) {
    const at::Tensor M = at::mm(wa.t(), aext);  // (r + 2, r + 1): ∂G, then the raw-parameter rows
    if (need_B) {
      out.B = narrow_g ? mm_into(gf.t(), ca.to(gf.scalar_type()), dt) : at::mm(gf.t(), ca);
      out.B.addmm_(B, M.narrow(0, 0, r).narrow(1, 0, r), 1.0, 2.0);
    }
    if (need_k) out.k = as_grad(M.select(0, r).select(0, r), raw_k);
    if (need_s) out.s = as_grad(M.select(0, r + 1).select(0, r), raw_s);
  }
  return out;
}

// Under autocast a 16-bit x is kept as it came (narrow_x), so the node holds T·din 16-bit values between
// forward and backward, as PEFT LoRA's autocast products hold x.
void save_hyp(AutogradContext* ctx, const HypSaved& sv, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& raw_k, const at::Tensor& raw_s, const at::Tensor& x, double scale, double cut,
              bool narrow, const at::Tensor& weight = at::Tensor()) {
  ctx->save_for_backward({sv.xf, A, B, sv.a, sv.sqq, raw_k, raw_s, weight});
  ctx->saved_data["narrow"] = narrow;
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["cut"] = cut;
  ctx->saved_data["x_sizes"] = x.sizes().vec();
}

// (x, result) → result + scale·Δ(x): the base layer's output computed outside the node.
struct HypLinear : public OnceDifferentiable<HypLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& result,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& raw_k,
                            const at::Tensor& raw_s, double scale, double cut) {
    const bool narrow = under_autocast(x);
    NoAutocast no_autocast;
    const at::Tensor res = result.reshape({-1, B.size(0)});
    auto fw = hyp_forward(x, A, B, raw_k, raw_s, res, false, scale, cut, narrow);
    save_hyp(ctx, fw.first, A, B, raw_k, raw_s, x, scale, cut, narrow);
    return at::_unsafe_view(fw.second, result.sizes());
  }

  static variable_list backward_impl(AutogradContext* ctx, const variable_list& grads) {
    const auto v = ctx->get_saved_variables();
    variable_list out(8);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const HypGrads gr = hyp_backward(g, {v[0], v[3], v[4]}, v[1], v[2], v[5], v[6],
                                     ctx->saved_data["scale"].toDouble(), ctx->saved_data["cut"].toDouble(),
                                     ctx->saved_data["narrow"].toBool(), ctx->needs_input_grad(0),
                                     ctx->needs_input_grad(2), ctx->needs_input_grad(3), ctx->needs_input_grad(4),
                                     ctx->needs_input_grad(5));
    if (gr.x.defined()) out[0] = gr.x.view(ctx->saved_data["x_sizes"].toIntVector());  // cast to x's dtype by the engine
    if (ctx->needs_input_grad(1)) out[1] = g;
    out[2] = gr.A;
    out[3] = gr.B;
    out[4] = gr.k;
    out[5] = gr.s;
    return out;
  }
};

// x → x Wᵀ (+ b) + scale·Δ(x) with a frozen base weight: the base product inside the node, the update
// written onto it in place, and ∂L/∂x = g W + (the adapter's share) without a separate base node.
struct HypLinearBase : public OnceDifferentiable<HypLinearBase> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& raw_k, const at::Tensor& raw_s, double scale, double cut) {
    const bool narrow = under_autocast(x);
    NoAutocast no_autocast;
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor res = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    save_hyp(ctx, hyp_forward(x, A, B, raw_k, raw_s, res, true, scale, cut, narrow).first, A, B, raw_k, raw_s, x,
             scale, cut, narrow, weight);
    ctx->saved_data["has_bias"] = has_bias;
    auto shape = x.sizes().vec();
    shape.back() = res.size(1);
    return at::_unsafe_view(res, shape);
  }

  static variable_list backward_impl(AutogradContext* ctx, const variable_list& grads) {
    const auto v = ctx->get_saved_variables();
    variable_list out(9);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    // needs_input_grad counts tensor inputs only: x, weight, the bias when given, A, B, raw K, raw s
    const size_t o = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0);
    const HypGrads gr = hyp_backward(g, {v[0], v[3], v[4]}, v[1], v[2], v[5], v[6],
                                     ctx->saved_data["scale"].toDouble(), ctx->saved_data["cut"].toDouble(),
                                     ctx->saved_data["narrow"].toBool(), need_x, ctx->needs_input_grad(2 + o),
                                     ctx->needs_input_grad(3 + o), ctx->needs_input_grad(4 + o),
                                     ctx->needs_input_grad(5 + o));
    if (need_x) {
      const at::Tensor& weight = v[7];
      at::Tensor dx = at::mm(g.reshape({-1, g.size(-1)}), weight);
      dx.add_(gr.x);  // the adapter's share (adapter dtype, or 16-bit under narrow_x) added to g W
      out[0] = dx.view(ctx->saved_data["x_sizes"].toIntVector());
    }
    out[3] = gr.A;
    out[4] = gr.B;
    out[5] = gr.k;
    out[6] = gr.s;
    return out;
  }
};

void check_hyp_adapter(const at::Tensor& A, const at::Tensor& B, const at::Tensor& raw_k, const at::Tensor& raw_s) {
  TORCH_CHECK(A.size(0) <= 64, "HypLoRA layer: rank ", A.size(0), " > 64");
  TORCH_CHECK(A.scalar_type() == B.scalar_type() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "HypLoRA layer: A and B must share a float32/float64 dtype");
  TORCH_CHECK(raw_k.numel() == 1 && raw_s.numel() == 1 && raw_k.scalar_type() == raw_s.scalar_type(),
              "HypLoRA layer: one raw curvature and one raw scale of one dtype");
}

at::Tensor hyplora_linear(const at::Tensor& x, const at::Tensor& result, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& raw_k, const at::Tensor& raw_s, double scale, double cut) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1) && x.size(-1) == A.size(1) &&
                  result.size(-1) == B.size(0),
              "HypLoRA layer: shapes do not chain");
  check_hyp_adapter(A, B, raw_k, raw_s);
  return HypLinear::apply(x, result, A, B, raw_k, raw_s, scale, cut);
}

at::Tensor hyplora_layer(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& raw_k, const at::Tensor& raw_s,
                         double scale, double cut) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == A.size(1) && weight.size(0) == B.size(0) &&
                  x.scalar_type() == weight.scalar_type() && !weight.requires_grad() &&
                  !(bias.has_value() && bias->defined() && bias->requires_grad()),
              "HypLoRA layer: the base weight must be frozen, of x's dtype, and chain with A and B");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1) && x.size(-1) == A.size(1),
              "HypLoRA layer: shapes do not chain");
  check_hyp_adapter(A, B, raw_k, raw_s);
  return HypLinearBase::apply(x, weight, bias, A, B, raw_k, raw_s, scale, cut);
}

// y = x Wᵀ (+ b) + s·z Bᵀ, z = g ⊗ a, [a, logits] = x [A; R]ᵀ, g = softmax(logits): as
// adapters.hydralora._HydraLinearFn, with the gate work (softmax, outer product and their backward) in
// hydra_gates.{cu,cpp} for float32/float64 adapters. HydraLinear forms the base product inside the node;
// HydraUpdate takes it from outside (result = base(x), any base: hooked, 4-bit) and the adapter's input
// separately (xd = dropout(x)), as PEFT's LoRA layer does.
//
// Under autocast to a 16-bit dtype c (`narrow`) every product takes its operands in c, as the module path's
// products do under autocast (PEFT's convention): x, W, b and [A; R], B rounded to c. Where the result feeds
// the gates ([a, logits], and in backward s·G B and the adapter gradients) it is written in the adapter dtype
// (float32 accumulation, no rounding of the result), so the gates, their softmax and their backward run in
// the adapter dtype; W x + s·z Bᵀ is one product in c, as under autocast. G B takes B as two 16-bit parts
// (g_times_b), and dx = G W + [da, dl]·[A; R] is formed in c and returned in x's dtype.
struct HydraGates {
  at::Tensor xc, wc, h, p, z;  // x in the products' dtype (T, din), [A; R], [a, logits], g, g ⊗ a
  at::Tensor xr;               // the router's own input (T, din) when A reads another (dropout(x)); else undefined
};

// [a, logits] = x [A; R]ᵀ as one product, or [xd Aᵀ, x Rᵀ] when the router reads its own input xr2 (A reads
// dropout(x), the router the clean x, as the module path).
HydraGates hydra_gates(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& R, int64_t r, bool narrow,
                       at::ScalarType cast_to, const at::Tensor& xr2 = at::Tensor()) {
  const at::ScalarType xt = narrow ? cast_to : A.scalar_type();  // the dtype x takes in the products
  HydraGates f;
  f.xc = x2.scalar_type() == xt ? x2 : x2.to(xt);
  f.wc = at::cat({A, R});
  const int64_t n = R.size(0), tokens = x2.size(0);
  if (xr2.defined()) {
    f.xr = xr2.scalar_type() == xt ? xr2 : xr2.to(xt);
    const at::Tensor a = narrow ? mm_into(f.xc, A.to(xt).t(), A.scalar_type()) : at::mm(f.xc, A.t());
    const at::Tensor l = narrow ? mm_into(f.xr, R.to(xt).t(), A.scalar_type()) : at::mm(f.xr, R.t());
    f.h = at::cat({a, l}, 1);
  } else {
    f.h = narrow ? mm_into(f.xc, f.wc.to(xt).t(), A.scalar_type()) : at::mm(f.xc, f.wc.t());
  }
  if (gates_kernels(f.h.scalar_type())) {
    f.p = at::empty({tokens, n}, f.h.options());
    f.z = at::empty({tokens, n * r}, f.h.options());
    const GatesForwardArgs g{dtype_code(f.h.scalar_type()), f.h.data_ptr(), f.p.data_ptr(), f.z.data_ptr(), tokens,
                             r, n, f.h.stride(0)};
    run_kernel("HydraLoRA gates forward kernel", g, f.h, GP_CUDA_KERNEL(hydra_gates_forward_cuda),
               hydra_gates_forward_cpu);
  } else {
    const at::Tensor a = f.h.narrow(1, 0, r), logits = f.h.narrow(1, r, n);
    f.p = at::softmax(logits, 1);
    f.z = at::mul(f.p.unsqueeze(2), a.unsqueeze(1)).view({tokens, -1});
  }
  return f;
}

// res + s·z Bᵀ (res: the base product, (T, dout)), in place when `in_place`: narrow, one product in the
// autocast dtype; else in the adapter dtype, rounded once to res's dtype.
at::Tensor add_update(const at::Tensor& res, const HydraGates& f, const at::Tensor& B, double s, bool narrow,
                      bool in_place) {
  if (narrow) {
    const auto xt = f.xc.scalar_type();
    if (res.scalar_type() == xt) {
      return in_place ? res.addmm_(f.z.to(xt), B.to(xt).t(), 1.0, s) : at::addmm(res, f.z.to(xt), B.to(xt).t(), 1.0, s);
    }
    const at::Tensor sum = at::addmm(res.to(xt), f.z.to(xt), B.to(xt).t(), 1.0, s);
    return in_place ? res.copy_(sum) : sum.to(res.scalar_type());
  }
  if (res.scalar_type() == B.scalar_type()) {
    return in_place ? res.addmm_(f.z, B.t(), 1.0, s) : at::addmm(res, f.z, B.t(), 1.0, s);
  }
  if (in_place) return res.add_(at::mm(f.z, B.t()), s);
  return at::addmm(res.to(B.scalar_type()), f.z, B.t(), 1.0, s).to(res.scalar_type());
}

void save_gates(AutogradContext* ctx, const HydraGates& f, const at::Tensor& B, const at::Tensor& weight,
                const at::Tensor& x, bool narrow, double scaling) {
  ctx->save_for_backward({f.xc, weight, f.wc, B, f.h, f.p, f.z, f.xr});
  ctx->saved_data["narrow"] = narrow;
  ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["x_sizes"] = x.sizes().vec();
  ctx->set_materialize_grads(false);
}

struct HydraGrads {
  at::Tensor g2, dh, A, R, B;  // G as (T, dout) in the products' dtype; ∂[a, logits]; the adapter's gradients
};

// The adapter's gradients from gy = ∂L/∂y and gp = ∂L/∂g (either may be undefined); dh when need_h.
HydraGrads hydra_gates_backward(const at::Tensor& gy, const at::Tensor& gp, const std::vector<at::Tensor>& saved,
                                double s, bool narrow, bool need_h, bool need_A, bool need_R, bool need_B) {
  const at::Tensor &xc = saved[0], &wc = saved[2], &B = saved[3], &h = saved[4], &p = saved[5], &z = saved[6];
  const int64_t tokens = p.size(0), n = p.size(1), r = h.size(1) - n;
  const at::ScalarType xt = xc.scalar_type();  // narrow: the autocast dtype
  HydraGrads out;
  const bool need_dz = need_h || need_A || need_R;
  at::Tensor dz;
  if (gy.defined()) {
    out.g2 = gy.reshape({tokens, gy.size(-1)});
    if (narrow) {
      if (out.g2.scalar_type() != xt) out.g2 = out.g2.to(xt);
      if (need_B) out.B = mm_into(out.g2.t(), z.to(xt), B.scalar_type()).mul_(s);  // s·Gᵀ(g ⊗ a)
      if (need_dz) dz = g_times_b(out.g2, B).mul_(s);  // s·G B, (tokens, n·r)
    } else {
      const at::Tensor gc = out.g2.scalar_type() == B.scalar_type() ? out.g2 : out.g2.to(B.scalar_type());
      const at::Tensor none = at::empty({}, gc.options());  // beta = 0: never read
      if (need_B) out.B = at::addmm(none, gc.t(), z, 0.0, s);  // s·Gᵀ(g ⊗ a)
      if (need_dz) dz = at::addmm(none, gc, B, 0.0, s);  // s·G B, (tokens, n·r)
    }
  }
  if ((dz.defined() || gp.defined()) && need_dz) {
    const at::Tensor gp2 = gp.defined() ? gp.reshape({tokens, n}).contiguous() : at::Tensor();
    if (gates_kernels(h.scalar_type())) {
      out.dh = at::empty({tokens, r + n}, h.options());
      const GatesBackwardArgs g{dtype_code(h.scalar_type()), dz.defined() ? dz.data_ptr() : nullptr, h.data_ptr(),
                                p.data_ptr(), gp2.defined() ? gp2.data_ptr() : nullptr, out.dh.data_ptr(), tokens,
                                r, n, h.stride(0)};
      run_kernel("HydraLoRA gates backward kernel", g, h, GP_CUDA_KERNEL(hydra_gates_backward_cuda),
                 hydra_gates_backward_cpu);
    } else {
      const at::Tensor a = h.narrow(1, 0, r);
      at::Tensor da, dp;
      if (dz.defined()) {
        const at::Tensor dz3 = dz.view({tokens, n, r});
        da = at::bmm(p.unsqueeze(1), dz3).view({tokens, r});  // Σ_i g_i dz_i
        dp = at::bmm(dz3, a.unsqueeze(2)).view({tokens, n});  // ⟨dz_i, a⟩
      }
      if (gp2.defined()) dp = dp.defined() ? dp + gp2 : gp2;
      const at::Tensor dl = at::_softmax_backward_data(dp, p, 1, p.scalar_type());
      if (!da.defined()) da = at::zeros({tokens, r}, dl.options());
      out.dh = at::cat({da, dl}, 1);
    }
    const at::Tensor& xr = saved[7];
    if (xr.defined()) {  // A read xc = dropout(x), the router xr = x
      const at::Tensor dhn = narrow ? out.dh.to(xt) : out.dh;
      if (need_A) {
        const at::Tensor da = dhn.narrow(1, 0, r).t();
        out.A = narrow ? mm_into(da, xc, wc.scalar_type()) : at::mm(da, xc);
      }
      if (need_R) {
        const at::Tensor dl = dhn.narrow(1, r, n).t();
        out.R = narrow ? mm_into(dl, xr, wc.scalar_type()) : at::mm(dl, xr);
      }
    } else if (need_A || need_R) {
      const at::Tensor dw = narrow ? mm_into(out.dh.to(xt).t(), xc, wc.scalar_type()) : at::mm(out.dh.t(), xc);
      if (need_A) out.A = dw.narrow(0, 0, r);
      if (need_R) out.R = dw.narrow(0, r, n);
    }
  }
  return out;
}

struct HydraLinear : public OnceDifferentiable<HydraLinear> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& R,
                               const at::Tensor& B, double scaling, int64_t r) {
    const auto cast_to = at::autocast::get_autocast_dtype(x.device().type());
    const bool narrow = under_autocast(x) && low_precision(cast_to);
    NoAutocast no_autocast;
    const auto shape = x.sizes().vec();
    const at::Tensor x2 = x.reshape({-1, shape.back()});
    const HydraGates f = hydra_gates(x2, A, R, r, narrow, cast_to);
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor out;
    if (narrow) {
      const auto xt = f.xc.scalar_type();
      const at::Tensor wn = weight.scalar_type() == xt ? weight : weight.to(xt);
      out = has_bias ? at::addmm(bias->to(xt), f.xc, wn.t()) : at::mm(f.xc, wn.t());
    } else {
      out = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    }
    add_update(out, f, B, scaling, narrow, true);
    save_gates(ctx, f, B, weight, x, narrow, scaling);
    ctx->saved_data["has_bias"] = has_bias;
    auto out_shape = shape;
    out_shape.back() = out.size(1);
    auto p_shape = shape;
    p_shape.back() = R.size(0);
    return {at::_unsafe_view(out, out_shape), at::_unsafe_view(f.p, p_shape)};
  }

  static variable_list backward_impl(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[1], &wc = saved[2];
    // needs_input_grad counts tensor inputs only: the bias is one when given
    const size_t o = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0), need_A = ctx->needs_input_grad(2 + o),
               need_R = ctx->needs_input_grad(3 + o), need_B = ctx->needs_input_grad(4 + o);
    const bool narrow = ctx->saved_data["narrow"].toBool();
    const HydraGrads gr = hydra_gates_backward(grads[0], grads[1], saved, ctx->saved_data["scaling"].toDouble(),
                                               narrow, need_x, need_A, need_R, need_B);
    variable_list out(8);
    out[3] = gr.A;
    out[4] = gr.R;
    out[5] = gr.B;
    const at::Tensor &g2 = gr.g2, &dh = gr.dh;
    if (narrow && need_x && (g2.defined() || dh.defined())) {
      const auto xt = saved[0].scalar_type();
      const at::Tensor wcn = wc.to(xt);
      at::Tensor dx2;
      if (g2.defined()) {
        dx2 = at::mm(g2, weight.scalar_type() == xt ? weight : weight.to(xt));
        if (dh.defined()) dx2.addmm_(dh.to(xt), wcn);
      } else {
        dx2 = at::mm(dh.to(xt), wcn);
      }
      const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
      out[0] = (dx2.scalar_type() == x_dtype ? dx2 : dx2.to(x_dtype)).view(ctx->saved_data["x_sizes"].toIntVector());
    } else if (need_x && (g2.defined() || dh.defined())) {
      at::Tensor dx2;
      if (!g2.defined()) {
        dx2 = at::mm(dh, wc).to(weight.scalar_type());
      } else {
        dx2 = at::mm(g2, weight);
        if (dh.defined()) {
          if (dx2.scalar_type() == wc.scalar_type()) {
            dx2.addmm_(dh, wc);
          } else {
            dx2.add_(at::mm(dh, wc));
          }
        }
      }
      out[0] = dx2.view(ctx->saved_data["x_sizes"].toIntVector());
    }
    return out;
  }
};

// (xd, result) → (result + s·z Bᵀ, g) with [a, logits] = xd [A; R]ᵀ: the base product computed outside the
// node; ∂L/∂result = G passes through, ∂L/∂xd = [da, dl]·[A; R] in xd's dtype.
// With a separate router input xr (A reads xd = dropout(x), the router x): ∂L/∂xd = da·A, ∂L/∂xr = dl·R.
struct HydraUpdate : public OnceDifferentiable<HydraUpdate> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& xd, const at::Tensor& result,
                               const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                               const c10::optional<at::Tensor>& router_x, double scaling, int64_t r) {
    const auto cast_to = at::autocast::get_autocast_dtype(xd.device().type());
    const bool narrow = under_autocast(xd) && low_precision(cast_to);
    NoAutocast no_autocast;
    const auto shape = xd.sizes().vec();
    const bool separate = router_x.has_value() && router_x->defined();
    const HydraGates f = hydra_gates(xd.reshape({-1, shape.back()}), A, R, r, narrow, cast_to,
                                     separate ? router_x->reshape({-1, shape.back()}) : at::Tensor());
    const at::Tensor out = add_update(result.reshape({-1, B.size(0)}), f, B, scaling, narrow, false);
    save_gates(ctx, f, B, at::Tensor(), xd, narrow, scaling);
    ctx->saved_data["separate"] = separate;
    if (separate) ctx->saved_data["router_dtype"] = static_cast<int64_t>(router_x->scalar_type());
    auto p_shape = shape;
    p_shape.back() = R.size(0);
    return {at::_unsafe_view(out, result.sizes()), at::_unsafe_view(f.p, p_shape)};
  }

  static variable_list backward_impl(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: xd, result, A, R, B, and the router's x when given
    const bool separate = ctx->saved_data["separate"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_xr = separate && ctx->needs_input_grad(5);
    const bool narrow = ctx->saved_data["narrow"].toBool();
    const HydraGrads gr = hydra_gates_backward(grads[0], grads[1], saved, ctx->saved_data["scaling"].toDouble(),
                                               narrow, need_x || need_xr, ctx->needs_input_grad(2),
                                               ctx->needs_input_grad(3), ctx->needs_input_grad(4));
    variable_list out(8);
    if (ctx->needs_input_grad(1)) out[1] = grads[0];
    out[2] = gr.A;
    out[3] = gr.R;
    out[4] = gr.B;
    if (!gr.dh.defined()) return out;
    const at::Tensor& wc = saved[2];
    const auto xt = saved[0].scalar_type();
    const at::Tensor dh = narrow ? gr.dh.to(xt) : gr.dh;
    const at::Tensor w = narrow ? wc.to(xt) : wc;
    const auto sizes = ctx->saved_data["x_sizes"].toIntVector();
    auto as_input = [&](const at::Tensor& d, const char* key) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
      return (d.scalar_type() == dtype ? d : d.to(dtype)).view(sizes);
    };
    if (!separate) {
      if (need_x) out[0] = as_input(at::mm(dh, w), "x_dtype");
      return out;
    }
    const int64_t n = saved[5].size(1), r = gr.dh.size(1) - n;
    if (need_x) out[0] = as_input(at::mm(dh.narrow(1, 0, r), w.narrow(0, 0, r)), "x_dtype");
    if (need_xr) out[5] = as_input(at::mm(dh.narrow(1, r, n), w.narrow(0, r, n)), "router_dtype");
    return out;
  }
};

std::vector<at::Tensor> hydra_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                                     int64_t r) {
  TORCH_CHECK(A.dim() == 2 && R.dim() == 2 && B.dim() == 2 && A.size(0) == r && B.size(1) == R.size(0) * r &&
                  x.size(-1) == A.size(1) && R.size(1) == A.size(1) && weight.size(1) == A.size(1) &&
                  weight.size(0) == B.size(0),
              "HydraLoRA layer: shapes do not chain");
  auto outs = HydraLinear::apply(x, weight, bias, A, R, B, scaling, r);
  return {outs[0], outs[1]};
}

std::vector<at::Tensor> hydra_update(const at::Tensor& xd, const at::Tensor& result, const at::Tensor& A,
                                     const at::Tensor& R, const at::Tensor& B,
                                     const c10::optional<at::Tensor>& router_x, double scaling, int64_t r) {
  TORCH_CHECK(A.dim() == 2 && R.dim() == 2 && B.dim() == 2 && A.size(0) == r && B.size(1) == R.size(0) * r &&
                  xd.size(-1) == A.size(1) && R.size(1) == A.size(1) && result.size(-1) == B.size(0) &&
                  result.numel() / B.size(0) == xd.numel() / A.size(1) &&
                  (!router_x.has_value() || !router_x->defined() || router_x->sizes() == xd.sizes()),
              "HydraLoRA update: shapes do not chain");
  auto outs = HydraUpdate::apply(xd, result, A, R, B, router_x, scaling, r);
  return {outs[0], outs[1]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "geoprobe adapter layer nodes (C++ autograd)";
  m.def("hyplora_linear", &hyplora_linear, "result + scale·Δ(x) of a HypLoRA layer, one autograd node");
  m.def("hyplora_layer", &hyplora_layer, "x Wᵀ (+ b) + scale·Δ(x) of a HypLoRA layer with a frozen base, one node");
  m.def("g_times_b", &g_times_b, "g B for a 16-bit g and a float32 B split into two 16-bit parts (HypLoRA backward)");
  m.def("hydra_linear", &hydra_linear, "HydraLoRA layer output and gates, one autograd node");
  m.def("hydra_update", &hydra_update, "result + HydraLoRA's update of dropout(x), and the gates, one autograd node");
  m.attr("cuda") = py::bool_(
#ifdef GEOPROBE_CUDA
      true
#else
      false
#endif
  );
}
