// Modified sub-trajectory balance (SubTB) loss, CPU kernels: forward and backward.
//
// Maths (docs/MATH.md §2). For one sequence with n generated tokens define the
// potential of every prefix state s_j, j = 0..n,
//
//     G[j] = sum_{t<j} log_pf[t] + log_pterm[j] - log_r[j],
//
// so that the residual of the sub-trajectory i -> j is simply res(i, j) = G[j] - G[i]. The
// kernel returns, per sequence,
//
//     num = sum_{0<=i<j<=n} lam^(j-i-1) (G[j] - G[i])^2,     den = sum_{i<j} lam^(j-i-1).
//
// O(n) instead of O(n^2): the weighted moments of the residuals of all pairs that end at j,
//     A_k(j) = sum_{i<j} lam^(j-1-i) (G[j] - G[i])^k,  k = 0, 1, 2,
// follow from the moments of the pairs that end at j-1, centred on G[j-1] and including i = j-1:
//     M_k(j-1) = lam * A_k(j-1) + [k == 0],     d = G[j] - G[j-1],
//     A_0(j) = M_0,  A_1(j) = M_1 + d M_0,  A_2(j) = M_2 + 2 d M_1 + d^2 M_0.
// Centring on the previous potential keeps every term the size of a residual, so no large
// values cancel. Accumulation is in double whatever the input dtype.
//
// Backward, for an upstream gradient g on num: dnum/dG[k] = 2 (A_1(k) - R_1(k)) with
//     R_1(k) = sum_{k<j<=n} lam^(j-k-1) (G[j] - G[k])      (pairs that start at k),
// a reverse scan: R_0(k) = 1 + lam R_0(k+1),  R_1(k) = e + lam (R_1(k+1) + e R_0(k+1)),
// e = G[k+1] - G[k]. Then d log_pterm[k] = dG[k], d log_r[k] = -dG[k] and
// d log_pf[t] = sum_{t<k<=n} dG[k]. Positions past n are never read and get exactly zero.
//
// lam > 1 (docs/MATH.md §2): num and den are returned scaled by lam^-(n-1), so that the pair
// (0, n) weighs 1 and nothing overflows. The scans then carry every quantity relative to the
// heaviest weight seen so far: with mu = 1 / lam, each step multiplies the accumulated sums
// by mu and adds the new start's weight mu^j instead of 1 ("Scan" below), and the backward's
// per-state moments are brought to the final scale with mu^(n-j) (pairs ending at j) and
// mu^k (pairs starting at k). For lam <= 1 every one of those factors is 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  bool any_double = a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble ||
                    c.scalar_type() == at::kDouble;
  return any_double ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& log_pf, const at::Tensor& log_pterm, const at::Tensor& log_r,
                  const at::Tensor& lengths) {
  TORCH_CHECK(log_pf.dim() == 2, "log_pf must be [B, T]");
  const auto B = log_pf.size(0), T = log_pf.size(1);
  TORCH_CHECK(log_pterm.dim() == 2 && log_pterm.size(0) == B && log_pterm.size(1) == T + 1,
              "log_pterm must be [B, T+1]");
  TORCH_CHECK(log_r.dim() == 2 && log_r.size(0) == B && log_r.size(1) == T + 1,
              "log_r must be [B, T+1]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "lengths must be [B]");
  TORCH_CHECK(log_pf.device().is_cpu() && log_pterm.device().is_cpu() &&
                  log_r.device().is_cpu() && lengths.device().is_cpu(),
              "fastgfn_cpu::subtb expects CPU tensors");
}

// Potentials G[0..n] of one sequence.
template <typename scalar_t>
void potentials(const scalar_t* pf, const scalar_t* pt, const scalar_t* r, int64_t n, double* G) {
  double F = 0.0;
  for (int64_t j = 0; j <= n; ++j) {
    G[j] = F + static_cast<double>(pt[j]) - static_cast<double>(r[j]);
    if (j < n) F += static_cast<double>(pf[j]);
  }
}

int64_t clamp_length(int64_t n, int64_t T) { return std::min<int64_t>(std::max<int64_t>(n, 0), T); }

// The scan factors: lam <= 1 carries the moments with lam and adds 1 per new pair start;
// lam > 1 keeps everything relative to the heaviest weight so far (see the header).
struct Scan {
  bool rescale;
  double carry;  // factor on the carried moments
  double decay;  // factor on the accumulated sums per step (mu = 1 / lam, or 1)
  explicit Scan(double lam)
      : rescale(lam > 1.0), carry(lam > 1.0 ? 1.0 : lam), decay(lam > 1.0 ? 1.0 / lam : 1.0) {}
  double pow(int64_t e) const { return rescale ? std::pow(decay, static_cast<double>(e)) : 1.0; }
};

std::tuple<at::Tensor, at::Tensor> subtb_forward(const at::Tensor& log_pf_in,
                                                 const at::Tensor& log_pterm_in,
                                                 const at::Tensor& log_r_in,
                                                 const at::Tensor& lengths_in, double lam) {
  check_inputs(log_pf_in, log_pterm_in, log_r_in, lengths_in);
  const auto dtype = compute_dtype(log_pf_in, log_pterm_in, log_r_in);
  const auto log_pf = log_pf_in.to(dtype).contiguous();
  const auto log_pterm = log_pterm_in.to(dtype).contiguous();
  const auto log_r = log_r_in.to(dtype).contiguous();
  const auto lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t B = log_pf.size(0), T = log_pf.size(1);
  auto num = at::zeros({B}, log_pf.options().dtype(dtype));
  auto den = at::zeros({B}, log_pf.options().dtype(dtype));
  const int64_t* len = lengths.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(dtype, "fastgfn_subtb_forward", [&] {
    const scalar_t* pf = log_pf.data_ptr<scalar_t>();
    const scalar_t* pt = log_pterm.data_ptr<scalar_t>();
    const scalar_t* r = log_r.data_ptr<scalar_t>();
    scalar_t* num_p = num.data_ptr<scalar_t>();
    scalar_t* den_p = den.data_ptr<scalar_t>();
    const Scan sc(lam);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> G(T + 1);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = clamp_length(len[b], T);
        potentials(pf + b * T, pt + b * (T + 1), r + b * (T + 1), n, G.data());
        double M0 = 1.0, M1 = 0.0, M2 = 0.0;  // moments of the pairs (i, 1), centred on G[0]
        double acc_num = 0.0, acc_den = 0.0, start = 1.0;
        for (int64_t j = 1; j <= n; ++j) {
          const double d = G[j] - G[j - 1];
          const double A0 = M0, A1 = M1 + d * M0, A2 = M2 + 2.0 * d * M1 + d * d * M0;
          acc_num = sc.decay * acc_num + A2;
          acc_den = sc.decay * acc_den + A0;
          start *= sc.decay;  // weight of the pair start i = j, relative to the current scale
          M0 = sc.carry * A0 + start;
          M1 = sc.carry * A1;
          M2 = sc.carry * A2;
        }
        num_p[b] = static_cast<scalar_t>(acc_num);
        den_p[b] = static_cast<scalar_t>(acc_den);
      }
    });
  });
  return {num, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subtb_backward(
    const at::Tensor& grad_num_in, const at::Tensor& log_pf_in, const at::Tensor& log_pterm_in,
    const at::Tensor& log_r_in, const at::Tensor& lengths_in, double lam) {
  check_inputs(log_pf_in, log_pterm_in, log_r_in, lengths_in);
  const auto dtype = compute_dtype(log_pf_in, log_pterm_in, log_r_in);
  const auto log_pf = log_pf_in.to(dtype).contiguous();
  const auto log_pterm = log_pterm_in.to(dtype).contiguous();
  const auto log_r = log_r_in.to(dtype).contiguous();
  const auto lengths = lengths_in.to(at::kLong).contiguous();
  const auto grad_num = grad_num_in.to(at::kDouble).contiguous();
  const int64_t B = log_pf.size(0), T = log_pf.size(1);
  TORCH_CHECK(grad_num.dim() == 1 && grad_num.size(0) == B, "grad_num must be [B]");
  auto d_pf = at::zeros_like(log_pf);
  auto d_pt = at::zeros_like(log_pterm);
  auto d_r = at::zeros_like(log_r);
  const int64_t* len = lengths.data_ptr<int64_t>();
  const double* g = grad_num.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES(dtype, "fastgfn_subtb_backward", [&] {
    const scalar_t* pf = log_pf.data_ptr<scalar_t>();
    const scalar_t* pt = log_pterm.data_ptr<scalar_t>();
    const scalar_t* r = log_r.data_ptr<scalar_t>();
    scalar_t* dpf = d_pf.data_ptr<scalar_t>();
    scalar_t* dpt = d_pt.data_ptr<scalar_t>();
    scalar_t* dr = d_r.data_ptr<scalar_t>();
    const Scan sc(lam);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> G(T + 1), A1(T + 1);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = clamp_length(len[b], T);
        if (n == 0) continue;
        potentials(pf + b * T, pt + b * (T + 1), r + b * (T + 1), n, G.data());
        // Forward scan: first moments of the pairs ending at each j, at the final scale.
        double M0 = 1.0, M1 = 0.0, start = 1.0;
        A1[0] = 0.0;
        for (int64_t j = 1; j <= n; ++j) {
          const double d = G[j] - G[j - 1];
          const double a1 = M1 + d * M0;
          A1[j] = a1 * sc.pow(n - j);
          start *= sc.decay;
          M1 = sc.carry * a1;
          M0 = sc.carry * M0 + start;
        }
        // Reverse scan: pairs starting at each k, gradients, suffix sum for log_pf.
        const double two_g = 2.0 * g[b];
        double R0 = 0.0, R1 = 0.0, suffix = 0.0, end = 1.0;
        scalar_t* dpf_b = dpf + b * T;
        scalar_t* dpt_b = dpt + b * (T + 1);
        scalar_t* dr_b = dr + b * (T + 1);
        for (int64_t k = n; k >= 0; --k) {
          if (k < n) {
            const double e = G[k + 1] - G[k];
            R1 = e * end + sc.carry * (R1 + e * R0);
            R0 = end + sc.carry * R0;
            end *= sc.decay;  // lam^-(n-k): the pair (k-1, k) at the scale of the next step
            dpf_b[k] = static_cast<scalar_t>(suffix);
          }
          const double dG = two_g * (A1[k] - R1 * sc.pow(k));
          dpt_b[k] = static_cast<scalar_t>(dG);
          dr_b[k] = static_cast<scalar_t>(-dG);
          suffix += dG;
        }
      }
    });
  });
  return {d_pf.to(log_pf_in.scalar_type()), d_pt.to(log_pterm_in.scalar_type()),
          d_r.to(log_r_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgfn_cpu, m) {
  m.def(
      "subtb_forward(Tensor log_pf, Tensor log_pterm, Tensor log_r, Tensor lengths, float lam)"
      " -> (Tensor, Tensor)");
  m.def(
      "subtb_backward(Tensor grad_num, Tensor log_pf, Tensor log_pterm, Tensor log_r,"
      " Tensor lengths, float lam) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgfn_cpu, CPU, m) {
  m.impl("subtb_forward", &subtb_forward);
  m.impl("subtb_backward", &subtb_backward);
}
