// Shared tile machinery of the per-token log-prob CPU kernels (logprobs.cpp, linear_logprobs.cpp).
//
// Maths (docs/MATH.md §1). With z' = c tanh(z / c) / tau + beta, every output of a row
// is a function of three per-row reductions over the vocabulary -- lse = log sum exp z', the
// entropy H = -sum p log p, and the logits z'[y], z'[e_k] at a few columns -- so the vocabulary
// is walked in tiles of kBlockV columns and only those reductions are kept.
//
// Tiles are merged exactly. A tile t of the vocabulary holds probability mass w_t =
// exp(lse_t - lse) and, normalised inside the tile, has entropy H_t. The entropy of a mixture
// of the tiles' distributions is H = sum_t w_t H_t - sum_t w_t log w_t, which folds online:
//     lse' = logaddexp(lse, lse_t),  a = exp(lse - lse'), b = exp(lse_t - lse'),
//     H'   = a (H - log a) + b (H_t - log b).
// Every quantity stays of the size of an entropy or a log-probability; nothing of the size of
// the logits (±1e4 in a peaked row) is subtracted from something of the same size, so peaked
// rows keep full relative accuracy (the textbook H = lse - E_p[z'] does not).
//
// Backward, for upstream gradients g_y (target), g_e (extra ids), g_H (entropy), g_l (lse):
//     dz'[v] = sum_j g_j (1[v = j] - p[v])  -  g_H p[v] (log p[v] + H)  +  g_l p[v]
//            = onehots  -  p[v] (G + g_H (log p[v] + H)),       G = g_y [y valid] + sum_k g_e,k - g_l
// then dz = dz' / tau * (1 - tanh^2(z / c)) (the second factor only with a softcap).
// p log p is taken as 0 where p == 0 (beta = -inf, or underflow): log p is clamped at -1000,
// below which exp underflows to 0 in both float and double.
//
// Per-tile arithmetic runs through ATen ops on small contiguous tiles (vectorised by ATen's
// own runtime CPU dispatch, AVX2/AVX-512) in the compute dtype: float for fp16/bf16/fp32
// inputs, double for double. Per-row statistics are merged in double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastgfn_logprobs {

constexpr int64_t kBlockN = 256;   // rows (tokens) per tile
constexpr int64_t kBlockV = 512;   // vocabulary columns per tile
constexpr double kLogFloor = -1000.0;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct Params {
  double inv_tau = 1.0;
  double softcap = 0.0;  // 0: none
  int64_t ignore_index = -100;
};

// Fold a tile's (lse_t, H_t) into a row's running (lse, H).
inline void merge_stats(double& lse, double& ent, double tile_lse, double tile_ent) {
  if (std::isnan(tile_lse)) {
    lse = tile_lse;
    ent = tile_lse;
    return;
  }
  if (tile_lse == kNegInf) return;
  if (lse == kNegInf) {
    lse = tile_lse;
    ent = tile_ent;
    return;
  }
  const double hi = std::max(lse, tile_lse);
  const double new_lse = hi + std::log(std::exp(lse - hi) + std::exp(tile_lse - hi));
  const double la = lse - new_lse, lb = tile_lse - new_lse;
  ent = std::exp(la) * (ent - la) + std::exp(lb) * (tile_ent - lb);
  lse = new_lse;
}

// Per-thread scratch tiles, allocated once per parallel range and reused for every tile so that
// the hot loop does not allocate (many short-lived tile-sized allocations from several threads
// fragment malloc arenas and inflate the process's resident memory).
struct Workspace {
  at::Tensor x, e, t;        // [kBlockN * kBlockV] each
  at::Tensor m, s, u;        // [kBlockN] row reductions
  Workspace(at::TensorOptions o) {
    x = at::empty({kBlockN * kBlockV}, o);
    e = at::empty({kBlockN * kBlockV}, o);
    t = at::empty({kBlockN * kBlockV}, o);
    m = at::empty({kBlockN}, o);
    s = at::empty({kBlockN}, o);
    u = at::empty({kBlockN}, o);
  }
  static at::Tensor tile(const at::Tensor& buf, int64_t bn, int64_t bv) {
    return buf.narrow(0, 0, bn * bv).view({bn, bv});
  }
  static at::Tensor row(const at::Tensor& buf, int64_t bn) { return buf.narrow(0, 0, bn); }
};

// Apply softcap / temperature / vocabulary bias to a raw logit tile z (contiguous, compute
// dtype) in place; if `tanh_out` is defined and a softcap is set, store tanh(z / c) there.
inline void transform_tile(at::Tensor& z, const c10::optional<at::Tensor>& beta_chunk,
                           const Params& P, at::Tensor* tanh_out) {
  if (P.softcap > 0.0) {
    z.mul_(1.0 / P.softcap).tanh_();
    if (tanh_out != nullptr) tanh_out->copy_(z);
    z.mul_(P.softcap * P.inv_tau);
  } else if (P.inv_tau != 1.0) {
    z.mul_(P.inv_tau);
  }
  if (beta_chunk.has_value()) z.add_(*beta_chunk);
}

// Output of the forward pass, per row: lse, entropy, z'[y], z'[e_k] (double).
struct RowStats {
  std::vector<double> lse, ent, tgt, extra;
};

// Tile logsumexp and entropy of x = z'[bn, bv] (destroys x). Writes per-row lse_t, H_t.
//   m = max_v x, y = max(x - m, -1000), e = exp y, s = sum e, u = sum e y
//   lse_t = m + log s,   H_t = log s - u / s.
template <typename scalar_t>
void tile_stats(at::Tensor& x, Workspace& ws, int64_t bn, int64_t bv, bool want_entropy,
                double* tile_lse, double* tile_ent) {
  at::Tensor m = Workspace::row(ws.m, bn), s = Workspace::row(ws.s, bn);
  at::Tensor u = Workspace::row(ws.u, bn), e = Workspace::tile(ws.e, bn, bv);
  at::amax_out(m, x, {1});
  scalar_t* mp = m.data_ptr<scalar_t>();
  std::vector<double> row_max(bn);
  for (int64_t r = 0; r < bn; ++r) {
    row_max[r] = static_cast<double>(mp[r]);
    if (std::isinf(mp[r])) mp[r] = 0;  // an all -inf (or +inf) row: keep x - m meaningful
  }
  x.sub_(m.unsqueeze(1)).clamp_min_(kLogFloor);
  at::exp_out(e, x);
  at::sum_out(s, e, {1});
  if (want_entropy) at::sum_out(u, e.mul_(x), {1});
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* up = u.data_ptr<scalar_t>();
  for (int64_t r = 0; r < bn; ++r) {
    if (row_max[r] == kNegInf) {
      tile_lse[r] = kNegInf;
      tile_ent[r] = 0.0;
      continue;
    }
    const double ls = std::log(static_cast<double>(sp[r]));
    tile_lse[r] = row_max[r] + ls;
    tile_ent[r] = want_entropy ? ls - static_cast<double>(up[r]) / static_cast<double>(sp[r])
                               : 0.0;
  }
}

// Forward driver. `produce(ws, r0, r1, v0, v1)` returns the transformed tile z'[r0:r1, v0:v1]
// (contiguous, compute dtype, normally a view of ws.x that the driver may modify). Work items
// are (row tile, vocabulary group) pairs; with few row tiles the vocabulary is split into
// groups whose statistics are merged at the end, so that small N still uses every thread.
template <typename scalar_t, typename Producer>
RowStats forward_driver(int64_t N, int64_t V, const int64_t* target, const int64_t* extra_ids,
                        int64_t K, bool want_entropy, at::TensorOptions copts, Producer produce) {
  const int64_t nt = ceil_div(N, kBlockN), nc = ceil_div(V, kBlockV);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t groups = 1;
  if (nt < 2 * threads)
    groups = std::min<int64_t>(nc, ceil_div(2 * threads, std::max<int64_t>(nt, 1)));
  const int64_t cpg = ceil_div(nc, std::max<int64_t>(groups, 1));
  groups = std::max<int64_t>(1, ceil_div(nc, cpg));

  std::vector<double> lse_part(groups * N, kNegInf), ent_part(groups * N, 0.0);
  RowStats out;
  out.tgt.assign(N, 0.0);
  out.extra.assign(N * K, 0.0);

  at::parallel_for(0, nt * groups, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(copts);
    std::vector<double> tl(kBlockN), te(kBlockN);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t ti = w / groups, g = w % groups;
      const int64_t r0 = ti * kBlockN, r1 = std::min(N, r0 + kBlockN), bn = r1 - r0;
      const int64_t c_end = std::min(nc, (g + 1) * cpg);
      for (int64_t c = g * cpg; c < c_end; ++c) {
        const int64_t v0 = c * kBlockV, v1 = std::min(V, v0 + kBlockV), bv = v1 - v0;
        at::Tensor x = produce(ws, r0, r1, v0, v1);
        const scalar_t* xp = x.data_ptr<scalar_t>();
        // Gather the target and extra columns that fall in this tile.
        for (int64_t r = 0; r < bn; ++r) {
          const int64_t y = target[r0 + r];
          if (y >= v0 && y < v1) out.tgt[r0 + r] = static_cast<double>(xp[r * bv + (y - v0)]);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t e = extra_ids[k];
            if (e >= v0 && e < v1)
              out.extra[(r0 + r) * K + k] = static_cast<double>(xp[r * bv + (e - v0)]);
          }
        }
        tile_stats<scalar_t>(x, ws, bn, bv, want_entropy, tl.data(), te.data());
        for (int64_t r = 0; r < bn; ++r)
          merge_stats(lse_part[g * N + r0 + r], ent_part[g * N + r0 + r], tl[r], te[r]);
      }
    }
  });
  out.lse.assign(N, kNegInf);
  out.ent.assign(N, 0.0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < groups; ++g)
      merge_stats(out.lse[r], out.ent[r], lse_part[g * N + r], ent_part[g * N + r]);
  return out;
}

// What every forward and backward call prepares first: the token ids as contiguous int64
// and the per-call constants. An id outside [0, V) (a target other than ignore_index, or an
// extra id) gives a NaN output and no gradient (docs/MATH.md §1): the public functions reject
// such ids when they may read values, and this is what is left when they may not.
struct TokenIds {
  at::Tensor target;  // [N] int64
  at::Tensor extra;   // [K] int64
  int64_t K;
  int64_t V;
  Params P;
  bool in_vocab(int64_t id) const { return id >= 0 && id < V; }
  // rows whose target is a vocabulary id (not ignore_index); extra ids in the vocabulary
  at::Tensor valid_rows() const {
    return target.ne(P.ignore_index).logical_and(target.ge(0)).logical_and(target.lt(V));
  }
  at::Tensor valid_extra() const { return extra.ge(0).logical_and(extra.lt(V)); }
};

inline TokenIds token_ids(const at::Tensor& target, const at::Tensor& extra_ids, int64_t V,
                          double temperature, double softcap, int64_t ignore_index) {
  TokenIds ids{target.to(at::kLong).contiguous(), extra_ids.to(at::kLong).contiguous(), 0, V,
               Params{1.0 / temperature, softcap, ignore_index}};
  ids.K = ids.extra.size(0);
  return ids;
}

// Pack the forward outputs: logp [N], extra [N, K], entropy [N] (or [0]), lse [N].
inline std::vector<at::Tensor> pack_outputs(const RowStats& s, const TokenIds& ids, int64_t N,
                                            bool want_entropy, at::TensorOptions opts) {
  const int64_t K = ids.K;
  const int64_t* target = ids.target.data_ptr<int64_t>();
  const int64_t* extra_ids = ids.extra.data_ptr<int64_t>();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto dopts = opts.dtype(at::kDouble);
  auto logp = at::empty({N}, dopts), extra = at::empty({N, K}, dopts), lse = at::empty({N}, dopts);
  auto ent = at::empty({want_entropy ? N : 0}, dopts);
  double* lp = logp.data_ptr<double>();
  double* ex = extra.data_ptr<double>();
  double* ls = lse.data_ptr<double>();
  double* en = ent.data_ptr<double>();
  for (int64_t r = 0; r < N; ++r) {
    ls[r] = s.lse[r];
    if (target[r] == ids.P.ignore_index) lp[r] = 0.0;
    else lp[r] = ids.in_vocab(target[r]) ? s.tgt[r] - s.lse[r] : nan;
    for (int64_t k = 0; k < K; ++k)
      ex[r * K + k] = ids.in_vocab(extra_ids[k]) ? s.extra[r * K + k] - s.lse[r] : nan;
    if (want_entropy) en[r] = s.ent[r];
  }
  const auto dt = opts.dtype().toScalarType();
  return {logp.to(dt), extra.to(dt), ent.to(dt), lse.to(dt)};
}

// The per-row inputs of a backward pass, [N] (ge: [N, K]) in the compute dtype: the saved
// lse, the upstream gradients g_y and g_e, and the row coefficient
//     G = g_y [y valid] + sum_k g_e,k [e_k valid] - g_lse
// (g_y and g_e are zeroed where the id is not valid: those outputs are constant NaN);
// with an entropy gradient also the saved entropy H and g_H (both undefined otherwise).
struct RowGrads {
  at::Tensor lse, G, gy, ge, ent, gH;
};

inline RowGrads row_grads(const at::Tensor& grad_logp, const at::Tensor& grad_extra,
                          const c10::optional<at::Tensor>& grad_entropy,
                          const at::Tensor& grad_lse, const at::Tensor& lse,
                          const at::Tensor& entropy, const TokenIds& ids, at::ScalarType cdt) {
  RowGrads g;
  g.lse = lse.to(cdt).contiguous();
  g.gy = at::where(ids.valid_rows(), grad_logp.to(cdt), 0.0).contiguous();
  g.ge = at::where(ids.valid_extra().unsqueeze(0), grad_extra.to(cdt), 0.0)
             .contiguous();
  auto G = g.gy.clone();
  if (grad_extra.numel() > 0) G.add_(g.ge.sum(1));
  G.sub_(grad_lse.to(cdt));
  g.G = G.contiguous();
  if (grad_entropy.has_value() && grad_entropy->numel() == g.lse.numel()) {
    g.gH = grad_entropy->to(cdt).contiguous();
    g.ent = entropy.to(cdt).contiguous();
  }
  return g;
}

// Turn the transformed tile x = z'[r0:r1, v0:v1] into dz (gradient w.r.t. the raw logit z),
// written into the workspace tile ws.e, and return it. `tanh_tile` holds tanh(z / c) with a
// softcap (it is overwritten). g.gH undefined: no entropy gradient.
template <typename scalar_t>
at::Tensor tile_backward(at::Tensor& x, at::Tensor& tanh_tile, Workspace& ws, int64_t r0,
                         int64_t r1, int64_t v0, int64_t v1, const RowGrads& g,
                         const TokenIds& ids) {
  const int64_t bn = r1 - r0, bv = v1 - v0, K = ids.K;
  const Params& P = ids.P;
  const at::Tensor &lse = g.lse, &ent = g.ent, &G = g.G, &gH = g.gH;
  const int64_t* target = ids.target.data_ptr<int64_t>();
  const int64_t* extra_ids = ids.extra.data_ptr<int64_t>();
  const scalar_t* gy = g.gy.data_ptr<scalar_t>();
  const scalar_t* ge = g.ge.data_ptr<scalar_t>();
  auto col = [&](const at::Tensor& t) { return t.narrow(0, r0, bn).unsqueeze(1); };
  at::Tensor lp = x.sub_(col(lse)).clamp_min_(kLogFloor);  // log p (p == 0 below the floor)
  at::Tensor p = Workspace::tile(ws.e, bn, bv);
  at::exp_out(p, lp);
  if (gH.defined()) {
    lp.add_(col(ent)).mul_(col(gH)).add_(col(G));
    p.mul_(lp).neg_();
  } else {
    p.mul_(col(G)).neg_();
  }
  scalar_t* dz = p.data_ptr<scalar_t>();
  for (int64_t r = 0; r < bn; ++r) {
    const int64_t y = target[r0 + r];
    if (y != P.ignore_index && y >= v0 && y < v1) dz[r * bv + (y - v0)] += gy[r0 + r];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = extra_ids[k];
      if (e >= v0 && e < v1) dz[r * bv + (e - v0)] += ge[(r0 + r) * K + k];
    }
  }
  if (P.softcap > 0.0) {
    // d(c tanh(z/c))/dz = 1 - tanh^2, folded with 1 / tau
    tanh_tile.mul_(tanh_tile).neg_().add_(1.0);
    if (P.inv_tau != 1.0) tanh_tile.mul_(P.inv_tau);
    p.mul_(tanh_tile);
  } else if (P.inv_tau != 1.0) {
    p.mul_(P.inv_tau);
  }
  return p;
}

}  // namespace fastgfn_logprobs
