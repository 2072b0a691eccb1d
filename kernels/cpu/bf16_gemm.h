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
// Without AMX, a CPU with AVX512-BF16 (Zen 4, Zen 5) runs MKL's product no faster than fp32
// (measured on a Zen 4: 0.69 s for the fused op's forward + backward at [480, 576] x 49152
// either way); there the products run on bf16_dot_gemm.h's vdpbf16ps kernel instead.
//
// The backend (bf16_gemm_backend): "mkl" where the CPU has AMX-BF16 (cpuid leaf 7, EDX bit
// 22), "avx512_bf16" where it has AVX512-BF16 without AMX, "off" elsewhere (the products then
// run in fp32). FASTGFN_CPU_BF16_GEMM (read at every call) overrides it: 0 = off, 1 = on with
// the CPU's backend (MKL where there is no bf16 instruction: it emulates the product
// correctly, slowly, so tests run the path on any CPU), mkl or avx512_bf16 = that backend
// (avx512_bf16 is refused on a CPU without the instruction).
#pragma once

#include <ATen/ATen.h>
#include <cpuid.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bf16_dot_gemm.h"

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

inline bool mkl_bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

// How bf16 x bf16 -> fp32 products run now (see the top).
enum class Bf16Gemm { off, mkl, avx512_bf16 };

inline Bf16Gemm bf16_gemm_backend() {
  static const bool amx = cpu_has_amx_bf16();
  const bool dot = cpu_has_avx512_bf16(), mkl = mkl_bf16_gemm_available();
  const char* env = std::getenv("FASTGFN_CPU_BF16_GEMM");
  const std::string want = env == nullptr ? "" : env;
  if (want == "0") return Bf16Gemm::off;
  if (want == "mkl") return mkl ? Bf16Gemm::mkl : Bf16Gemm::off;
  if (want == "avx512_bf16") {
    TORCH_CHECK(dot, "FASTGFN_CPU_BF16_GEMM=avx512_bf16: this CPU has no AVX512-BF16");
    return Bf16Gemm::avx512_bf16;
  }
  TORCH_CHECK(want.empty() || want == "1",
              "FASTGFN_CPU_BF16_GEMM must be 0, 1, mkl or avx512_bf16, got '", want, "'");
  if (amx && mkl) return Bf16Gemm::mkl;
  if (dot) return Bf16Gemm::avx512_bf16;
  return want == "1" && mkl ? Bf16Gemm::mkl : Bf16Gemm::off;
}

// "off", "mkl" or "avx512_bf16" (the op fastgfn_cpu::bf16_gemm_backend).
inline std::string bf16_gemm_backend_name() {
  switch (bf16_gemm_backend()) {
    case Bf16Gemm::mkl: return "mkl";
    case Bf16Gemm::avx512_bf16: return "avx512_bf16";
    default: return "off";
  }
}

inline bool bf16_gemm_enabled() { return bf16_gemm_backend() != Bf16Gemm::off; }

// Whether fp32 weights must be rounded to a bf16 copy for the products (MKL), or can go to
// them as they are (the avx512_bf16 kernel rounds them while packing).
inline bool weights_need_bf16_copy() { return bf16_gemm_backend() != Bf16Gemm::avx512_bf16; }

// C = alpha * op(A) op(B) + beta * C for 2-D views with unit column stride: A [M, K] (or [K, M]
// with trans_a), B [K, N] (or [N, K] with trans_b), C [M, N] fp32. A and B bf16; on the
// avx512_bf16 path B may be fp32 (weights_need_bf16_copy).
inline void gemm_bf16_f32(const at::Tensor& A, bool trans_a, const at::Tensor& B, bool trans_b,
                          at::Tensor& C, float alpha, float beta) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const bool dot = bf16_gemm_backend() == Bf16Gemm::avx512_bf16;
  TORCH_CHECK(A.scalar_type() == at::kBFloat16 && C.scalar_type() == at::kFloat &&
                  (B.scalar_type() == at::kBFloat16 || (dot && B.scalar_type() == at::kFloat)),
              "gemm_bf16_f32: bf16 operands (B may be fp32 on the avx512_bf16 path) and an fp32 "
              "result");
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
  if (dot) {
    gemm_bf16_f32_dot(A, trans_a, B, trans_b, C, alpha, beta);
    return;
  }
  cblas_gemm_bf16bf16f32(
      kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(M), int(N),
      int(K), alpha, reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>()),
      ld(A), reinterpret_cast<const uint16_t*>(B.data_ptr<at::BFloat16>()),
      ld(B), beta, C.data_ptr<float>(), ld(C));
}

}  // namespace fastgfn_gemm
