// Per-token log-probs fused with the lm_head, CPU kernels: z = h W^T + b is formed one tile of
// kBlockN tokens x kBlockV vocabulary entries at a time (BLAS through at::addmm on slices) and
// reduced on the spot (logprobs_common.h, docs/MATH.md §1), so the [N, V] logits never exist, in
// the forward or the backward pass.
//
// Forward: work items are (token tile, vocabulary group); each walks its vocabulary chunks
// with an online logsumexp / entropy merge. Without a softcap the whole affine part folds into
// one GEMM: z' = (h W^T + b) / tau + beta = addmm(b / tau + beta, h, W^T, alpha = 1 / tau).
//
// Backward: recompute each logit tile from h, W and the saved per-row lse (and entropy), form
// dz (logprobs_common.h), and accumulate
//     dW[v0:v1] += dz^T h_tile,   db[v0:v1] += sum_rows dz,   dh_tile += dz W[v0:v1].
// Threads own vocabulary chunks, so each chunk of dW (and db) is accumulated by one thread in
// fp32 (double for double inputs) over all token tiles and written once; dh is accumulated in
// per-thread [rows, H] buffers in the compute dtype, summed at the end. Rows are processed in
// blocks that keep those buffers within ~64 MiB (several blocks: dW accumulates across them in
// an fp32 [V, H] buffer). Memory: O(V H + min(N H threads, 64 MiB) + tiles), never O(N V).
//
// bf16 hidden states: the tiles are fp32 either way. Where bf16 x bf16 -> fp32 products are
// enabled (bf16_gemm.h: MKL on a CPU with AMX-BF16, our vdpbf16ps kernel on one with
// AVX512-BF16, or forced) the three products take bf16 operands — h, the weight rounded to
// bf16 (bf16 or fp32 master weights: MKL gets a bf16 copy, the vdpbf16ps kernel rounds while
// packing), and dz rounded to bf16 for dW and dh — and accumulate in fp32, like a GPU's
// tensor cores; elsewhere h is widened to fp32 and the products run in fp32. (oneDNN's fast
// bf16 path, at::mm, only writes bf16, which would round the logits.)
#include <torch/library.h>

#include <cstdlib>

#include "bf16_gemm.h"
#include "logprobs_common.h"

namespace {

using namespace fastgfn_logprobs;

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                  const at::Tensor& extra_ids, const c10::optional<at::Tensor>& vocab_bias) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [N, H]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight must be [V, H]");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(),
              "fastgfn_cpu::linear_logprobs expects CPU tensors");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), "target must be [N]");
  TORCH_CHECK(extra_ids.dim() == 1, "extra_ids must be [K]");
  const int64_t V = weight.size(0);
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "bias must be [V]");
  if (vocab_bias.has_value())
    TORCH_CHECK(vocab_bias->dim() == 1 && vocab_bias->size(0) == V, "vocab_bias must be [V]");
}

// Produces transformed logit tiles z'[r0:r1, v0:v1] from hidden states and the lm_head, and
// the two products of the backward. The products run in the GEMM dtype `gdt`: the compute
// dtype, or bf16 for bf16 hidden states where the bf16 -> fp32 product is enabled
// (bf16_gemm.h; the weight, bf16 or fp32 master weights, is rounded to bf16 for it). The
// tiles and everything computed on them stay in the compute dtype.
struct LinearTiles {
  at::Tensor h;                  // [N, H], GEMM dtype, contiguous
  at::Tensor weight;             // [V, H], any float dtype
  c10::optional<at::Tensor> b;   // lm_head bias, compute dtype (softcap path)
  c10::optional<at::Tensor> c;   // b / tau + beta (no-softcap path), compute dtype
  c10::optional<at::Tensor> beta;
  Params P;
  at::ScalarType cdt, gdt;

  bool bf16_products() const { return gdt == at::kBFloat16 && cdt == at::kFloat; }

  // The weight's rows v0..v1 for the products: in the GEMM dtype, except fp32 master weights
  // on the avx512_bf16 path, which its kernel rounds while packing (no bf16 copy).
  at::Tensor weight_chunk(int64_t v0, int64_t v1) const {
    at::Tensor w = weight.slice(0, v0, v1);
    const bool keep_fp32 = bf16_products() && w.scalar_type() == at::kFloat &&
                           !fastgfn_gemm::weights_need_bf16_copy();
    if ((w.scalar_type() == gdt || keep_fp32) && w.is_contiguous()) return w;
    return w.to(keep_fp32 ? at::kFloat : gdt).contiguous();
  }

  // C += op(A) op(B), C in the compute dtype, A and B in the GEMM dtype.
  void add_product(at::Tensor& C, const at::Tensor& A, bool trans_a, const at::Tensor& B,
                   bool trans_b) const {
    if (bf16_products()) fastgfn_gemm::gemm_bf16_f32(A, trans_a, B, trans_b, C, 1.0f, 1.0f);
    else C.addmm_(trans_a ? A.t() : A, trans_b ? B.t() : B);
  }

  // z = alpha h_tile w^T (+ add, a [bv] row broadcast over the tile's rows)
  void logits(at::Tensor& z, const at::Tensor& ht, const at::Tensor& w,
              const c10::optional<at::Tensor>& add, double alpha) const {
    if (bf16_products()) {
      if (add.has_value()) z.copy_(add->unsqueeze(0).expand_as(z));
      fastgfn_gemm::gemm_bf16_f32(ht, false, w, true, z, float(alpha),
                                  add.has_value() ? 1.0f : 0.0f);
    } else if (add.has_value()) {
      at::addmm_out(z, *add, ht, w.t(), 1.0, alpha);
    } else {
      at::mm_out(z, ht, w.t());
      if (alpha != 1.0) z.mul_(alpha);
    }
  }

  at::Tensor operator()(Workspace& ws, int64_t r0, int64_t r1, int64_t v0, int64_t v1,
                        const at::Tensor& w, at::Tensor* tanh_out) const {
    at::Tensor ht = h.slice(0, r0, r1);
    at::Tensor z = Workspace::tile(ws.x, r1 - r0, v1 - v0);
    auto chunk = [&](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
      if (!t.has_value()) return c10::nullopt;
      return t->slice(0, v0, v1);
    };
    if (P.softcap > 0.0) {
      logits(z, ht, w, chunk(b), 1.0);
      transform_tile(z, chunk(beta), P, tanh_out);
      return z;
    }
    logits(z, ht, w, chunk(c), P.inv_tau);
    return z;
  }
};

at::ScalarType gemm_dtype(const at::Tensor& hidden, at::ScalarType cdt) {
  return hidden.scalar_type() == at::kBFloat16 && fastgfn_gemm::bf16_gemm_enabled()
             ? at::kBFloat16
             : cdt;
}

// `whole_weight`: convert the weight to the GEMM dtype once here (the forward reads every
// chunk once per row tile) rather than chunk by chunk (the backward reads each chunk once);
// not fp32 weights on the avx512_bf16 path, whose kernel rounds them while packing.
LinearTiles make_tiles(const at::Tensor& hidden, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& vocab_bias, const Params& P,
                       at::ScalarType cdt, bool whole_weight) {
  const at::ScalarType gdt = gemm_dtype(hidden, cdt);
  const bool convert = whole_weight && weight.scalar_type() != gdt &&
                       !(gdt == at::kBFloat16 && weight.scalar_type() == at::kFloat &&
                         !fastgfn_gemm::weights_need_bf16_copy());
  at::Tensor w = convert ? weight.to(gdt) : weight;
  LinearTiles t{hidden.to(gdt).contiguous(), w, {}, {}, {}, P, cdt, gdt};
  const auto copts = hidden.options().dtype(cdt);
  if (vocab_bias.has_value()) t.beta = vocab_bias->to(cdt).contiguous();
  if (bias.has_value()) t.b = bias->to(cdt).contiguous();
  if (P.softcap <= 0.0 && (t.b.has_value() || t.beta.has_value())) {
    at::Tensor c = t.b.has_value() ? t.b->mul(P.inv_tau) : at::zeros({weight.size(0)}, copts);
    if (t.beta.has_value()) c.add_(*t.beta);
    t.c = c.contiguous();
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target_in, const at::Tensor& extra_in,
    const c10::optional<at::Tensor>& vocab_bias, double temperature, double softcap,
    int64_t ignore_index, bool entropy) {
  check_inputs(hidden, weight, bias, target_in, extra_in, vocab_bias);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto cdt = compute_dtype(hidden.scalar_type());
  const TokenIds ids = token_ids(target_in, extra_in, V, temperature, softcap, ignore_index);
  const LinearTiles tiles = make_tiles(hidden, weight, bias, vocab_bias, ids.P, cdt, true);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(cdt, "fastgfn_linear_logprobs_forward", [&] {
    auto stats = forward_driver<scalar_t>(
        N, V, ids.target.data_ptr<int64_t>(), ids.extra.data_ptr<int64_t>(), ids.K, entropy,
        hidden.options().dtype(cdt),
        [&](Workspace& ws, int64_t r0, int64_t r1, int64_t v0, int64_t v1) {
          return tiles(ws, r0, r1, v0, v1, tiles.weight_chunk(v0, v1), nullptr);
        });
    out = pack_outputs(stats, ids, N, entropy, hidden.options().dtype(cdt));
  });
  return {out[0], out[1], out[2], out[3]};
}

// Rows per backward block: the per-thread dh buffers (threads x rows x H) stay within ~64 MiB,
// so that memory does not grow with N times the thread count. FASTGFN_LOGPROBS_ROW_BLOCK
// overrides it (tests use it to exercise several blocks on small inputs).
int64_t backward_row_block(int64_t N, int64_t H, int64_t threads, size_t elem) {
  if (const char* env = std::getenv("FASTGFN_LOGPROBS_ROW_BLOCK")) {
    const int64_t r = std::atoll(env);
    if (r > 0) return std::min<int64_t>(std::max<int64_t>(N, 1), r);
  }
  const int64_t budget = int64_t(64) << 20;
  int64_t r = budget / std::max<int64_t>(1, threads * H * static_cast<int64_t>(elem));
  r = std::max<int64_t>(kBlockN, (r / kBlockN) * kBlockN);
  return std::min<int64_t>(std::max<int64_t>(N, 1), r);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& grad_logp, const at::Tensor& grad_extra,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target_in, const at::Tensor& extra_in,
    const c10::optional<at::Tensor>& vocab_bias, const at::Tensor& lse_in,
    const at::Tensor& entropy_in, double temperature, double softcap, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias) {
  check_inputs(hidden, weight, bias, target_in, extra_in, vocab_bias);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto cdt = compute_dtype(hidden.scalar_type());
  const TokenIds ids = token_ids(target_in, extra_in, V, temperature, softcap, ignore_index);
  const LinearTiles tiles = make_tiles(hidden, weight, bias, vocab_bias, ids.P, cdt, false);

  const RowGrads g =
      row_grads(grad_logp, grad_extra, grad_entropy, grad_lse, lse_in, entropy_in, ids, cdt);
  const auto copts = hidden.options().dtype(cdt);

  at::Tensor dW = need_weight ? at::empty({V, H}, weight.options()) : at::Tensor();
  at::Tensor db = need_bias ? at::empty({V}, bias.has_value() ? bias->options() : copts)
                            : at::Tensor();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_per_block = backward_row_block(N, H, threads, at::elementSize(cdt));
  const int64_t nblocks = ceil_div(N, rows_per_block), nc = ceil_div(V, kBlockV);
  // One row block: each dW chunk is accumulated in a thread-local tile and written once.
  // Several: dW (and db) accumulate across blocks in compute-dtype buffers.
  at::Tensor dW_full = need_weight && nblocks > 1 ? at::zeros({V, H}, copts) : at::Tensor();
  at::Tensor db_full = need_bias && nblocks > 1 ? at::zeros({V}, copts) : at::Tensor();
  at::Tensor dh = need_hidden ? at::empty({N, H}, copts) : at::Tensor();
  std::vector<at::Tensor> dh_parts(threads);

  AT_DISPATCH_FLOATING_TYPES(cdt, "fastgfn_linear_logprobs_backward", [&] {
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t R0 = blk * rows_per_block, R1 = std::min(N, R0 + rows_per_block);
      const int64_t nt = ceil_div(R1 - R0, kBlockN);
      for (auto& part : dh_parts)
        if (part.defined()) part.zero_();
      at::parallel_for(0, nc, 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
        if (need_hidden && !dh_parts[tid].defined())
          dh_parts[tid] = at::zeros({rows_per_block, H}, copts);
        Workspace ws(copts);
        at::Tensor dw_buf = need_weight ? at::empty({kBlockV, H}, copts) : at::Tensor();
        at::Tensor db_buf = need_bias ? at::empty({kBlockV}, copts) : at::Tensor();
        at::Tensor db_row = need_bias ? at::empty({kBlockV}, copts) : at::Tensor();
        at::Tensor dz_gemm_buf = tiles.bf16_products()
                                     ? at::empty({kBlockN * kBlockV}, copts.dtype(tiles.gdt))
                                     : at::Tensor();
        for (int64_t c = begin; c < end; ++c) {
          const int64_t v0 = c * kBlockV, v1 = std::min(V, v0 + kBlockV), bv = v1 - v0;
          const at::Tensor w = tiles.weight_chunk(v0, v1);
          at::Tensor dw_acc = need_weight ? dw_buf.narrow(0, 0, bv).zero_() : at::Tensor();
          at::Tensor db_acc = need_bias ? db_buf.narrow(0, 0, bv).zero_() : at::Tensor();
          for (int64_t ti = 0; ti < nt; ++ti) {
            const int64_t r0 = R0 + ti * kBlockN, r1 = std::min(R1, r0 + kBlockN);
            at::Tensor t = Workspace::tile(ws.t, r1 - r0, bv);
            at::Tensor x = tiles(ws, r0, r1, v0, v1, w, softcap > 0.0 ? &t : nullptr);
            at::Tensor dz = tile_backward<scalar_t>(x, t, ws, r0, r1, v0, v1, g, ids);
            const at::Tensor ht = tiles.h.slice(0, r0, r1);
            at::Tensor dz_g = dz;  // dz in the GEMM dtype
            if (dz_gemm_buf.defined()) {
              dz_g = Workspace::tile(dz_gemm_buf, r1 - r0, bv);
              dz_g.copy_(dz);
            }
            if (need_weight) tiles.add_product(dw_acc, dz_g, true, ht, false);
            if (need_bias) {
              at::Tensor part = db_row.narrow(0, 0, bv);
              at::sum_out(part, dz, {0});
              db_acc.add_(part);
            }
            if (need_hidden) {
              at::Tensor dh_rows = dh_parts[tid].slice(0, r0 - R0, r1 - R0);
              tiles.add_product(dh_rows, dz_g, false, w, false);
            }
          }
          if (need_weight) {
            if (nblocks == 1) dW.slice(0, v0, v1).copy_(dw_acc);
            else dW_full.slice(0, v0, v1).add_(dw_acc);
          }
          if (need_bias) {
            if (nblocks == 1) db.slice(0, v0, v1).copy_(db_acc);
            else db_full.slice(0, v0, v1).add_(db_acc);
          }
        }
      });
      if (need_hidden) {
        at::Tensor out = dh.slice(0, R0, R1);
        out.zero_();
        for (auto& part : dh_parts)
          if (part.defined()) out.add_(part.narrow(0, 0, R1 - R0));
      }
    }
  });
  if (need_weight && nblocks > 1) dW.copy_(dW_full);
  if (need_bias && nblocks > 1) db.copy_(db_full);
  if (nblocks == 0) {  // no rows (N == 0): nothing was accumulated, the sums are zero
    if (need_weight) dW.zero_();
    if (need_bias) db.zero_();
  }
  if (need_hidden) dh = dh.to(hidden.scalar_type());
  // Gradients that were not asked for come back as empty tensors (the schema has no Tensor?).
  auto none = [&] { return at::empty({0}, copts); };
  return {dh.defined() ? dh : none(), dW.defined() ? dW : none(), db.defined() ? db : none()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgfn_cpu, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target,"
      " Tensor extra_ids, Tensor? vocab_bias, float temperature, float softcap,"
      " int ignore_index, bool entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor grad_logp, Tensor grad_extra, Tensor? grad_entropy,"
      " Tensor grad_lse, Tensor hidden, Tensor weight, Tensor? bias, Tensor target,"
      " Tensor extra_ids, Tensor? vocab_bias, Tensor lse, Tensor entropy, float temperature,"
      " float softcap, int ignore_index, bool need_hidden, bool need_weight, bool need_bias)"
      " -> (Tensor, Tensor, Tensor)");
}

// How the bf16 x bf16 -> fp32 products run on this CPU now: "off", "mkl" or "avx512_bf16"
// (bf16_gemm.h). No tensor arguments, so one kernel for every dispatch key.
TORCH_LIBRARY_FRAGMENT(fastgfn_cpu, m) {
  m.def("bf16_gemm_backend() -> str", [] { return fastgfn_gemm::bf16_gemm_backend_name(); });
}

TORCH_LIBRARY_IMPL(fastgfn_cpu, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward);
}
