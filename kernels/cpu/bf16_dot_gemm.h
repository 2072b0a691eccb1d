// bf16 x bf16 -> fp32 matrix products on AVX512-BF16 dot products (vdpbf16ps), one thread,
// for CPUs that have the instruction but no AMX (AMD Zen 4 and Zen 5, Intel Cooper Lake),
// where MKL's cblas_gemm_bf16bf16f32 runs no faster than fp32 (bf16_gemm.h).
//
//     C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C,   A, B bf16, C fp32.
//
// vdpbf16ps multiplies pairs: acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1] in fp32 over the 16
// lanes of a zmm register. So both operands are packed with the reduction index k in pairs:
//   A                       one 32-bit word (A[m, 2 k2], A[m, 2 k2 + 1]) per row and pair:
//                           a row-major A as it is, a transposed one packed,
//   B -> Bp[panel][k2][n]   one word (B[2 k2, n], B[2 k2 + 1, n]) per pair and column, in
//                           panels of kPanel = 64 columns (four zmm registers),
// with zeros past K and past N, so no lane reads outside the packed buffers. An fp32 B (the
// fp32 master weights under autocast) is rounded to bf16 as it is packed (vcvtne2ps2bf16,
// to nearest even like at::Tensor::to), so no bf16 copy of the weight is ever made. The micro-kernel
// keeps a kRows x 64 block of C in 4 kRows zmm accumulators and, for each pair k2, broadcasts
// one word of A per row against the panel's four words of B. A bf16 x bf16 product is exact
// in fp32 (8 + 8 significant bits); each pair sum and accumulation rounds like an fp32 FMA.
// Loop order: panel by panel (a 64-column panel of B over K = 576 is 74 KB, kept in L2)
// against all rows of A.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

namespace fastgfn_gemm {

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace dot_detail {

constexpr int64_t kPanel = 64;  // columns of C per micro-kernel call (4 zmm of 16 fp32)
constexpr int kRows = 6;        // rows of C per micro-kernel call (24 accumulators)

typedef uint32_t word_alias __attribute__((may_alias, aligned(2)));  // two bf16, read as one

// The lanes [0, left) of a 16-lane mask, left clamped to [0, 16].
inline __mmask16 first_lanes16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

// The bf16 bits of a value: a bf16's own, an fp32 rounded to nearest even (as at::Tensor::to).
inline uint32_t bf16_bits(uint16_t x) { return x; }
inline uint32_t bf16_bits(float x) { return c10::BFloat16(x).x; }

// The word (row[k], row[k + 1]) of a stored row, zero past K: the scalar packing of every
// operand layout the vector paths do not take (odd K, unaligned rows).
template <typename T>
inline uint32_t pair_word(const T* row, int64_t k, int64_t K) {
  return bf16_bits(row[k]) | (k + 1 < K ? bf16_bits(row[k + 1]) << 16 : 0u);
}

// dst[j] = (r0[j], r1[j]) as one word for j < n, r1 == nullptr reading as zeros: two rows of a
// matrix interleaved, 32 columns per step (AVX512-BW word permutes).
__attribute__((target("avx512f,avx512bw"))) inline void interleave_rows(
    const uint16_t* r0, const uint16_t* r1, int64_t n, uint32_t* dst) {
  alignas(64) static const uint16_t lo_idx[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                  11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                  53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                  27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = std::min<int64_t>(32, n - j);
    const __mmask32 m = left == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1u);
    const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + j);
    const __m512i b = r1 == nullptr ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, r1 + j);
    _mm512_mask_storeu_epi32(dst + j, first_lanes16(left),
                             _mm512_permutex2var_epi16(a, lo, b));
    _mm512_mask_storeu_epi32(dst + j + 16, first_lanes16(left - 16),
                             _mm512_permutex2var_epi16(a, hi, b));
  }
}

// Panels of B from B stored [K, N] (ld >= N): Bp[(p K2 + k2) kPanel + j] = (B[2 k2, n],
// B[2 k2 + 1, n]), n = p kPanel + j, zero past K and N.
inline void pack_b_rows(const uint16_t* b, int64_t ld, int64_t K, int64_t N, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanel, nn = std::min(kPanel, N - n0);
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      uint32_t* dst = out + (p * K2 + k2) * kPanel;
      const int64_t k = 2 * k2;
      interleave_rows(b + k * ld + n0, k + 1 < K ? b + (k + 1) * ld + n0 : nullptr, nn, dst);
      std::fill(dst + nn, dst + kPanel, 0u);
    }
  }
}

// The panels of pack_b_cols below, one word at a time, from bf16 or fp32 B stored [N, K].
template <typename T>
inline void pack_b_cols_scalar(const T* b, int64_t ld, int64_t K, int64_t N, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k2 = 0; k2 < K2; ++k2)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        out[(p * K2 + k2) * kPanel + j] = n < N ? pair_word(b + n * ld, 2 * k2, K) : 0u;
      }
}

// The same panels from B stored transposed, [N, K] (ld >= K): a word of B's pair k2 at column
// n is the word k2 of stored row n, so each panel row gathers 16 words from 16 stored rows.
__attribute__((target("avx512f"))) inline void pack_b_cols(const uint16_t* b, int64_t ld,
                                                            int64_t K, int64_t N,
                                                            uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  if (K % 2 != 0 || ld % 2 != 0 || (reinterpret_cast<uintptr_t>(b) & 3u) != 0 ||
      N * (ld / 2) > INT32_MAX) {
    pack_b_cols_scalar(b, ld, K, N, out);  // odd K, or rows not word-aligned
    return;
  }
  const int32_t ldw = int32_t(ld / 2);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t p = 0; p < panels; ++p) {
    for (int q = 0; q < 4; ++q) {
      const int64_t n0 = p * kPanel + 16 * q;
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, N - n0));
      const __mmask16 m = first_lanes16(left);
      const __m512i rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(ldw));
      const int* base = reinterpret_cast<const int*>(b) + (left > 0 ? n0 * ldw : 0);
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows,
                                                      base + k2, 4);
        _mm512_storeu_si512(out + (p * K2 + k2) * kPanel + 16 * q, w);
      }
    }
  }
}

// The two packers above for an fp32 B (fp32 master weights), rounding to bf16 (to nearest
// even, as at::Tensor::to does) while packing instead of through a bf16 copy of B.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void pack_b_rows_f32(
    const float* b, int64_t ld, int64_t K, int64_t N, uint32_t* out) {
  alignas(64) static const uint16_t pairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                 21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(pairs);
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanel, nn = std::min(kPanel, N - n0);
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      uint32_t* dst = out + (p * K2 + k2) * kPanel;
      const float* r0 = b + 2 * k2 * ld + n0;
      const float* r1 = 2 * k2 + 1 < K ? r0 + ld : nullptr;
      for (int64_t j = 0; j < kPanel; j += 16) {
        const __mmask16 m = first_lanes16(nn - j);
        const __m512 lo = _mm512_maskz_loadu_ps(m, r0 + j);
        const __m512 hi = r1 == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, r1 + j);
        // [bf16(lo) x 16, bf16(hi) x 16] -> (lo_j, hi_j) words
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst + j, _mm512_permutexvar_epi16(idx, both));
      }
    }
  }
}

__attribute__((target("avx512f,avx512bf16"))) inline void pack_b_cols_f32(
    const float* b, int64_t ld, int64_t K, int64_t N, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  if (K % 2 != 0 || N * ld * int64_t(sizeof(float)) > INT32_MAX) {
    pack_b_cols_scalar(b, ld, K, N, out);  // odd K, or offsets past int32
    return;
  }
  // byte offsets of 8 stored rows; one 64-bit gather reads the pair (k, k + 1) of each
  const __m256i rows8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(int32_t(ld * sizeof(float))));
  for (int64_t p = 0; p < panels; ++p) {
    for (int q = 0; q < 4; ++q) {
      const int64_t n0 = p * kPanel + 16 * q;
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, N - n0));
      const __mmask16 m = first_lanes16(left);  // rows 0..7 in m0, rows 8..15 in m1
      const __mmask8 m0 = __mmask8(m & 0xFFu), m1 = __mmask8(m >> 8);
      const char* base0 = reinterpret_cast<const char*>(b + (left > 0 ? n0 * ld : 0));
      const char* base1 = reinterpret_cast<const char*>(b + (left > 8 ? (n0 + 8) * ld : 0));
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        const int64_t off = 2 * k2 * int64_t(sizeof(float));
        const __m512d g0 = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m0, rows8,
                                                    base0 + off, 1);
        const __m512d g1 = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m1, rows8,
                                                    base1 + off, 1);
        // g0 = [row 0: k, k + 1, row 1: k, k + 1, ...] as floats: converted in order, the
        // bf16 pairs are the words of rows 0..7, then g1's of rows 8..15
        const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_castpd_ps(g1),
                                                        _mm512_castpd_ps(g0));
        _mm512_storeu_si512(out + (p * K2 + k2) * kPanel + 16 * q, w);
      }
    }
  }
}

// C[0:MR, 0:cols] = alpha * sum_k2 A-words x B-panel + beta * C; the word of A for row i and
// pair k2 is a[i * sa + k2 * sk].
template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void micro_kernel(
    int64_t K2, const uint32_t* a, int64_t sa, int64_t sk, const uint32_t* b, float* c,
    int64_t ldc, int64_t cols, float alpha, float beta) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const uint32_t* bk = b + k2 * kPanel;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bk + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bk + 32);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bk + 48);
    const uint32_t* ak = a + k2 * sk;
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(ak[i * sa]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, b2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], ai, b3);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    for (int j = 0; j < 4; ++j) {
      if (cols <= 16 * j) break;
      const __mmask16 mask = first_lanes16(cols - 16 * j);
      __m512 r = _mm512_mul_ps(va, acc[i][j]);
      if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, ci + 16 * j), r);
      _mm512_mask_storeu_ps(ci + 16 * j, mask, r);
    }
  }
}

}  // namespace dot_detail

// C = alpha * op(A) op(B) + beta * C for 2-D views with unit column stride: A bf16, B bf16 or
// fp32 (rounded to bf16 as it is packed), C fp32 (the contract of gemm_bf16_f32 in
// bf16_gemm.h). The caller checks cpu_has_avx512_bf16().
// A row-major A with an even K and even row stride is read in place; a transposed A is
// packed pair-major (two stored rows interleaved); B always goes into panels.
inline void gemm_bf16_f32_dot(const at::Tensor& A, bool trans_a, const at::Tensor& B,
                              bool trans_b, at::Tensor& C, float alpha, float beta) {
  using namespace dot_detail;
  const int64_t M = C.size(0), N = C.size(1), K = trans_a ? A.size(0) : A.size(1);
  const int64_t K2 = (K + 1) / 2, panels = (N + kPanel - 1) / kPanel;
  auto ld = [](const at::Tensor& t) { return std::max<int64_t>(t.stride(0), t.size(1)); };
  const auto* a16 = reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>());
  const int64_t lda = ld(A), ldb = ld(B);
  thread_local std::vector<uint32_t> ap, bp;
  const uint32_t* a = nullptr;
  int64_t sa = 0, sk = 0;
  if (trans_a) {  // A stored [K, M]: pair k2 = stored rows 2 k2, 2 k2 + 1 interleaved
    ap.resize(size_t(K2 * M));
    for (int64_t k2 = 0; k2 < K2; ++k2)
      interleave_rows(a16 + 2 * k2 * lda, 2 * k2 + 1 < K ? a16 + (2 * k2 + 1) * lda : nullptr,
                      M, ap.data() + k2 * M);
    a = ap.data(), sa = 1, sk = M;
  } else if (K % 2 == 0 && lda % 2 == 0 && (reinterpret_cast<uintptr_t>(a16) & 3u) == 0) {
    a = reinterpret_cast<const word_alias*>(a16), sa = lda / 2, sk = 1;
  } else {  // odd K or an odd row stride: copy the rows into words, zero past K
    ap.resize(size_t(M * K2));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k2 = 0; k2 < K2; ++k2) ap[m * K2 + k2] = pair_word(a16 + m * lda, 2 * k2, K);
    a = ap.data(), sa = K2, sk = 1;
  }
  bp.resize(size_t(panels * K2 * kPanel));
  if (B.scalar_type() == at::kFloat) {
    const float* b32 = B.data_ptr<float>();
    if (trans_b) pack_b_cols_f32(b32, ldb, K, N, bp.data());
    else pack_b_rows_f32(b32, ldb, K, N, bp.data());
  } else {
    const auto* b16 = reinterpret_cast<const uint16_t*>(B.data_ptr<at::BFloat16>());
    if (trans_b) pack_b_cols(b16, ldb, K, N, bp.data());
    else pack_b_rows(b16, ldb, K, N, bp.data());
  }
  float* c = C.data_ptr<float>();
  const int64_t ldc = ld(C);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
    const uint32_t* panel = bp.data() + p * K2 * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const uint32_t* am = a + m0 * sa;
      float* cm = c + m0 * ldc + n0;
      switch (std::min<int64_t>(kRows, M - m0)) {
        case 6: micro_kernel<6>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
        case 5: micro_kernel<5>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
        case 4: micro_kernel<4>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
        case 3: micro_kernel<3>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
        case 2: micro_kernel<2>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
        default: micro_kernel<1>(K2, am, sa, sk, panel, cm, ldc, cols, alpha, beta); break;
      }
    }
  }
}

}  // namespace fastgfn_gemm
