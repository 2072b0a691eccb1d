// Per-token log-probs from logits [N, V], CPU kernels: forward and backward.
//
// Maths and tiling: logprobs_common.h (docs/MATH.md §1). One pass over the vocabulary per row
// tile computes lse, entropy and the target / extra-id logits without ever writing an [N, V]
// log-softmax; the backward pass recomputes p = exp(z' - lse) tile by tile from the saved
// per-row lse and entropy and writes d logits (the only [N, V] tensor, because it is the
// gradient of an [N, V] input).
#include <torch/library.h>

#include "logprobs_common.h"

namespace {

using namespace fastgfn_logprobs;

void check_common(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& extra_ids,
                  const c10::optional<at::Tensor>& vocab_bias) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V]");
  TORCH_CHECK(logits.device().is_cpu(), "fastgfn_cpu::logprobs expects CPU tensors");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target must be [N]");
  TORCH_CHECK(extra_ids.dim() == 1, "extra_ids must be [K]");
  if (vocab_bias.has_value())
    TORCH_CHECK(vocab_bias->dim() == 1 && vocab_bias->size(0) == logits.size(1),
                "vocab_bias must be [V]");
}

// Transformed tile of a logits tensor: a contiguous copy (in the workspace), compute dtype.
struct LogitsTiles {
  const at::Tensor& logits;
  c10::optional<at::Tensor> beta;  // vocab_bias, compute dtype, contiguous
  Params P;
  at::Tensor operator()(Workspace& ws, int64_t r0, int64_t r1, int64_t v0, int64_t v1,
                        at::Tensor* tanh_out) const {
    at::Tensor z = Workspace::tile(ws.x, r1 - r0, v1 - v0);
    z.copy_(logits.slice(0, r0, r1).slice(1, v0, v1));
    c10::optional<at::Tensor> bc;
    if (beta.has_value()) bc = beta->slice(0, v0, v1);
    transform_tile(z, bc, P, tanh_out);
    return z;
  }
};

LogitsTiles make_tiles(const at::Tensor& logits, const c10::optional<at::Tensor>& vocab_bias,
                       const Params& P, at::ScalarType cdt) {
  LogitsTiles t{logits, {}, P};
  if (vocab_bias.has_value()) t.beta = vocab_bias->to(cdt).contiguous();
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const at::Tensor& target_in, const at::Tensor& extra_in,
    const c10::optional<at::Tensor>& vocab_bias_in, double temperature, double softcap,
    int64_t ignore_index, bool entropy) {
  check_common(logits, target_in, extra_in, vocab_bias_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto cdt = compute_dtype(logits.scalar_type());
  const TokenIds ids = token_ids(target_in, extra_in, V, temperature, softcap, ignore_index);
  const LogitsTiles tiles = make_tiles(logits, vocab_bias_in, ids.P, cdt);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(cdt, "fastgfn_logprobs_forward", [&] {
    auto stats = forward_driver<scalar_t>(
        N, V, ids.target.data_ptr<int64_t>(), ids.extra.data_ptr<int64_t>(), ids.K, entropy,
        logits.options().dtype(cdt),
        [&](Workspace& ws, int64_t r0, int64_t r1, int64_t v0, int64_t v1) {
          return tiles(ws, r0, r1, v0, v1, nullptr);
        });
    out = pack_outputs(stats, ids, N, entropy, logits.options().dtype(cdt));
  });
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& grad_extra,
                             const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& grad_lse, const at::Tensor& logits,
                             const at::Tensor& target_in, const at::Tensor& extra_in,
                             const c10::optional<at::Tensor>& vocab_bias_in,
                             const at::Tensor& lse_in, const at::Tensor& entropy_in,
                             double temperature, double softcap, int64_t ignore_index) {
  check_common(logits, target_in, extra_in, vocab_bias_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto cdt = compute_dtype(logits.scalar_type());
  const TokenIds ids = token_ids(target_in, extra_in, V, temperature, softcap, ignore_index);
  const LogitsTiles tiles = make_tiles(logits, vocab_bias_in, ids.P, cdt);

  const RowGrads g =
      row_grads(grad_logp, grad_extra, grad_entropy, grad_lse, lse_in, entropy_in, ids, cdt);
  auto dlogits = at::empty({N, V}, logits.options());
  const int64_t nt = ceil_div(N, kBlockN), nc = ceil_div(V, kBlockV);

  AT_DISPATCH_FLOATING_TYPES(cdt, "fastgfn_logprobs_backward", [&] {
    // Row tiles x vocabulary chunks: every work item writes its own block of d logits.
    at::parallel_for(0, nt * nc, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(logits.options().dtype(cdt));
      for (int64_t w = begin; w < end; ++w) {
        const int64_t ti = w / nc, c = w % nc;
        const int64_t r0 = ti * kBlockN, r1 = std::min(N, r0 + kBlockN);
        const int64_t v0 = c * kBlockV, v1 = std::min(V, v0 + kBlockV);
        at::Tensor t = Workspace::tile(ws.t, r1 - r0, v1 - v0);
        at::Tensor x = tiles(ws, r0, r1, v0, v1, softcap > 0.0 ? &t : nullptr);
        at::Tensor dz = tile_backward<scalar_t>(x, t, ws, r0, r1, v0, v1, g, ids);
        dlogits.slice(0, r0, r1).slice(1, v0, v1).copy_(dz);
      }
    });
  });
  return dlogits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgfn_cpu, m) {
  m.def(
      "logprobs_forward(Tensor logits, Tensor target, Tensor extra_ids, Tensor? vocab_bias,"
      " float temperature, float softcap, int ignore_index, bool entropy)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_backward(Tensor grad_logp, Tensor grad_extra, Tensor? grad_entropy,"
      " Tensor grad_lse, Tensor logits, Tensor target, Tensor extra_ids, Tensor? vocab_bias,"
      " Tensor lse, Tensor entropy, float temperature, float softcap, int ignore_index)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgfn_cpu, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}
