// Router gates of the HydraLoRA layer node (arXiv 2404.19245; adapters.hydralora), CUDA and CPU.
//
// Per token, with h = [a, logits] = x [A; R]ᵀ (a: r values, logits: n values, row stride sh):
//   forward   p = softmax(logits),  z = p ⊗ a  (z_{i·r+j} = p_i a_j)
//   backward  given dz = s·g B (n·r values per token, or none) and the gates' own gradient gp (or none):
//             da_j = Σ_i p_i dz_{i·r+j},  dp_i = Σ_j dz_{i·r+j} a_j + gp_i,  dl_i = p_i (dp_i − Σ_k p_k dp_k),
//             written as one row dh = [da, dl] (r + n values).
// One pass over each token's few values in place of the softmax, the outer product, two batched products,
// the softmax backward and a concatenation (six kernels on the GPU).
#pragma once
#include <stdint.h>

#include "dtype_codes.h"

struct GatesForwardArgs {
  int compute_type;  // kFloat32 or kFloat64
  const void* h;     // (T, r + n), row stride sh
  void* p;           // (T, n) contiguous
  void* z;           // (T, n·r) contiguous
  int64_t T, r, n, sh;
};

struct GatesBackwardArgs {
  int compute_type;
  const void* dz;  // (T, n·r) contiguous, or null
  const void* h;   // (T, r + n), row stride sh
  const void* p;   // (T, n) contiguous
  const void* gp;  // (T, n) contiguous, or null
  void* dh;        // (T, r + n) contiguous
  int64_t T, r, n, sh;
};

// Each returns null on success, else a message.
const char* hydra_gates_forward_cuda(const GatesForwardArgs& a, void* stream);
const char* hydra_gates_backward_cuda(const GatesBackwardArgs& a, void* stream);
const char* hydra_gates_forward_cpu(const GatesForwardArgs& a);
const char* hydra_gates_backward_cpu(const GatesBackwardArgs& a);
