// bf16 x bf16 -> fp32 matrix products for the fused lm_head kernels (linear_logprobs.cpp).
//
//     C[M, N] = alpha * op(A) op(B) + beta * C,   A, B bf16,  C and the accumulation fp32.
//
// ATen has no CPU product of bf16 operands into an fp32 result (at::mm of bf16 rounds its output
// to bf16, which costs a logit of size 20 an error of 0.06). MKL has one,
// cblas_gemm_bf16bf16f32, and libtorch_cpu exports it: on a CPU with AMX it runs on the tile
// unit at about 5x the fp32 product's rate (measured on 2 cores of a Xeon with amx_bf16: 1.6
// TFLOP/s against 0.33 for a [256, 576] x [576, 512] tile, bench/RESULTS.md). The symbol is
// bound weakly, so a libtorch without MKL loads this library and simply never takes the path.
//
// When it is taken (bf16_gemm_enabled): the CPU has AMX-BF16 (cpuid leaf 7, EDX bit 22), or
// FASTGFN_CPU_BF16_GEMM=1 forces it (tests run it on any CPU: MKL emulates it correctly, if
// slowly, without bf16 instructions); FASTGFN_CPU_BF16_GEMM=0 turns it off.
#pragma once

#include <ATen/ATen.h>
#include <cpuid.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace fastgfn_gemm {

inline bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22) & 1u;
}

inline bool bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

inline bool bf16_gemm_enabled() {
  if (!bf16_gemm_available()) return false;
  const char* env = std::getenv("FASTGFN_CPU_BF16_GEMM");
  if (env != nullptr && *env != '\0') return *env == '1';
  static const bool amx = cpu_has_amx_bf16();
  return amx;
}

// C = alpha * op(A) op(B) + beta * C for 2-D views with unit column stride: A [M, K] (or [K, M]
// with trans_a), B [K, N] (or [N, K] with trans_b), C [M, N] fp32.
inline void gemm_bf16_f32(const at::Tensor& A, bool trans_a, const at::Tensor& B, bool trans_b,
                          at::Tensor& C, float alpha, float beta) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  TORCH_CHECK(A.scalar_type() == at::kBFloat16 && B.scalar_type() == at::kBFloat16 &&
                  C.scalar_type() == at::kFloat,
              "gemm_bf16_f32: bf16 operands and an fp32 result");
  TORCH_CHECK(A.stride(1) == 1 && B.stride(1) == 1 && C.stride(1) == 1,
              "gemm_bf16_f32: rows must be contiguous");
  const int64_t M = C.size(0), N = C.size(1), K = trans_a ? A.size(0) : A.size(1);
  if (M == 0 || N == 0) return;
  // leading dimensions: a row stride, at least the row length (a one-row view may report less)
  auto ld = [](const at::Tensor& t) { return int(std::max<int64_t>(t.stride(0), t.size(1))); };
  if (K == 0) {
    if (beta == 0.0f) C.zero_();
    else if (beta != 1.0f) C.mul_(beta);
    return;
  }
  cblas_gemm_bf16bf16f32(
      kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(M), int(N),
      int(K), alpha, reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>()),
      ld(A), reinterpret_cast<const uint16_t*>(B.data_ptr<at::BFloat16>()),
      ld(B), beta, C.data_ptr<float>(), ld(C));
}

}  // namespace fastgfn_gemm
