"""The SubTB loss family against float64 oracles: every backend, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

import fastgfn
from fastgfn.ops.subtb import subtb_pair_sums
from fastgfn.reference.subtb import pair_sums_log_scale, subtb_pair_sums_reference

from .conftest import requires_triton, triton_device

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=requires_triton)]


def device_for(backend: str) -> str:
    return triton_device() if backend == "triton" else "cpu"


def random_batch(B, T, *, seed, lengths=None, dtype=torch.float32, device="cpu", scale=2.0):
    g = torch.Generator().manual_seed(seed)
    log_pf = -torch.rand(B, T, generator=g, dtype=torch.float64) * scale
    log_pterm = -torch.rand(B, T + 1, generator=g, dtype=torch.float64) * scale
    log_r = torch.randn(B, T + 1, generator=g, dtype=torch.float64) * scale
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0] = T
        if B > 1:
            lengths[1] = 0
    return (
        log_pf.to(dtype=dtype, device=device),
        log_pterm.to(dtype=dtype, device=device),
        log_r.to(dtype=dtype, device=device),
        torch.as_tensor(lengths, device=device),
    )


def brute_force_pair_sums(log_pf, log_pterm, log_r, lengths, lam):
    """Every (i, j) pair of every sequence, the residual written as in docs/MATH.md §2."""
    num, den = [], []
    for b in range(log_pf.shape[0]):
        n = int(lengths[b])
        total, weight = 0.0, 0.0
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                res = (
                    float(log_r[b, i])
                    + sum(float(log_pf[b, k]) for k in range(i, j))
                    + float(log_pterm[b, j])
                    - float(log_r[b, j])
                    - float(log_pterm[b, i])
                )
                w = 1.0 if j - i - 1 == 0 else float(lam) ** (j - i - 1)
                total += w * res * res
                weight += w
        num.append(total)
        den.append(weight)
    return torch.tensor(num, dtype=torch.float64), torch.tensor(den, dtype=torch.float64)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# The reference itself against brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("T", [1, 2, 7, 12])
def test_reference_matches_brute_force(lam, T):
    inputs = random_batch(6, T, seed=T * 10 + int(lam * 10), dtype=torch.float64)
    num, den = subtb_pair_sums_reference(*inputs, lam)
    bnum, bden = brute_force_pair_sums(*inputs, lam)
    assert_close(num, bnum, rtol=1e-12, atol=1e-12, what="num")
    assert_close(den, bden, rtol=1e-12, atol=1e-12, what="den")


# --------------------------------------------------------------------------------------------
# Every backend against the float64 reference: values and gradients
# --------------------------------------------------------------------------------------------


def check_backend_against_reference(backend, B, T, lam, seed, dtype=torch.float32):
    device = device_for(backend)
    inputs = random_batch(B, T, seed=seed, dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
    lengths = inputs[3]
    num, den = subtb_pair_sums(*leaves, lengths, lam, backend)
    grad = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (num.double() * grad.to(device)).sum().backward()

    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs[:3]]
    rnum, rden = subtb_pair_sums_reference(*ref_leaves, lengths.cpu(), lam)
    (rnum * grad).sum().backward()

    scale = float(rnum.detach().abs().max()) if B else 1.0
    # The Triton kernels do their maths in fp32 whatever the input dtype (documented).
    tol = 1e-9 if dtype == torch.float64 and backend != "triton" else 2e-6
    assert_close(num, rnum, rtol=tol * 10, atol=tol * max(scale, 1.0), what="num")
    assert_close(den, rden, rtol=1e-6, atol=1e-6, what="den")
    for name, leaf, ref in zip(("log_pf", "log_pterm", "log_r"), leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype, name
        gscale = max(float(ref.grad.abs().max()) if ref.grad.numel() else 1.0, 1.0)
        assert_close(leaf.grad, ref.grad, rtol=tol * 10, atol=tol * gscale * 4, what=name)
    # padding gets exactly zero gradient
    n = lengths.cpu()[:, None]
    steps = torch.arange(T)[None, :]
    states = torch.arange(T + 1)[None, :]
    assert (leaves[0].grad.cpu()[steps >= n] == 0).all()
    assert (leaves[1].grad.cpu()[states > n] == 0).all()
    assert (leaves[2].grad.cpu()[states > n] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("T", [1, 2, 7, 64, 257])
def test_backend_matches_reference(backend, lam, T):
    B = 5 if T < 257 else 3
    check_backend_against_reference(backend, B, T, lam, seed=T + int(100 * lam))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_float64_and_lam_zero(backend):
    check_backend_against_reference(backend, 4, 33, 1.0, seed=7, dtype=torch.float64)
    check_backend_against_reference(backend, 4, 33, 0.0, seed=8)  # detailed balance


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_brute_force_loss(backend):
    device = device_for(backend)
    inputs = random_batch(7, 9, seed=3, device=device)
    for lam in (1.0, 0.9, 0.5):
        loss = fastgfn.subtb_loss(*inputs, lam=lam, backend=backend)
        bnum, bden = brute_force_pair_sums(*[t.cpu() for t in inputs], lam)
        assert_close(loss, bnum.sum() / bden.sum(), rtol=1e-5, atol=1e-5, what=f"lam={lam}")


def native_dtype_pair_sums(log_pf, log_pterm, log_r, lengths, lam):
    """The reference maths evaluated in the inputs' own low-precision dtype: PyTorch's error."""
    B, T = log_pf.shape
    dtype = log_pf.dtype
    n = lengths[:, None]
    pf = torch.where(torch.arange(T)[None] < n, log_pf, torch.zeros((), dtype=dtype))
    states = torch.arange(T + 1)[None]
    pt = torch.where(states <= n, log_pterm, torch.zeros((), dtype=dtype))
    r = torch.where(states <= n, log_r, torch.zeros((), dtype=dtype))
    F = torch.cat([pf.new_zeros(B, 1), pf.cumsum(1)], 1)
    pot = F + pt - r
    res = pot[:, None, :] - pot[:, :, None]
    i = states.view(1, T + 1, 1)
    j = states.view(1, 1, T + 1)
    pair = (i < j) & (j <= n[:, :, None])
    w = torch.where(pair, torch.tensor(lam, dtype=dtype) ** (j - i - 1).clamp(min=0).to(dtype), 0)
    return (w * res * res).sum((1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    device = device_for(backend)
    inputs = random_batch(6, 40, seed=11, dtype=dtype, device=device, scale=1.0)
    oracle, _ = subtb_pair_sums_reference(*[t.cpu() for t in inputs], 0.9)
    ours, _ = subtb_pair_sums(*inputs, 0.9, backend)
    torch_native = native_dtype_pair_sums(*[t.cpu() for t in inputs], 0.9)
    our_err = (ours.double().cpu() - oracle).abs().max()
    torch_err = (torch_native.double() - oracle).abs().max()
    assert our_err <= 2 * torch_err + 1e-4 * float(oracle.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    device = device_for(backend)
    pf, pt, r, lengths = random_batch(4, 20, seed=5, device=device)
    leaves = [pf.bfloat16().requires_grad_(), pt.half().requires_grad_(), r.requires_grad_()]
    loss = fastgfn.subtb_loss(*leaves, lengths, lam=0.9, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16, torch.float16, torch.float32]
    ref = fastgfn.subtb_loss(*[x.detach().double() for x in leaves], lengths, 0.9,
                             backend="reference")
    assert_close(loss, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Edge cases: empty sequences, padding garbage, non-finite values, strides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_empty_sequences_and_empty_batch(backend):
    device = device_for(backend)
    inputs = random_batch(3, 5, seed=1, lengths=[0, 0, 0], device=device)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    for reduction in ("mean", "seq_mean", "sum"):
        loss = fastgfn.subtb_loss(*leaves, inputs[3], reduction=reduction, backend=backend)
        assert float(loss) == 0.0
        loss.backward()
    assert all((x.grad == 0).all() for x in leaves)
    empty = random_batch(0, 4, seed=1, lengths=torch.zeros(0, dtype=torch.long), device=device)
    assert float(fastgfn.subtb_loss(*empty, backend=backend)) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_garbage_never_leaks(backend):
    device = device_for(backend)
    pf, pt, r, lengths = random_batch(4, 10, seed=2, lengths=[3, 10, 0, 6], device=device)
    clean = fastgfn.subtb_loss(pf, pt, r, lengths, reduction="none", backend=backend)
    steps, states = torch.arange(10, device=device), torch.arange(11, device=device)
    n = lengths[:, None]
    pf2 = torch.where(steps[None] >= n, torch.nan, pf)
    pt2 = torch.where(states[None] > n, -torch.inf, pt)
    r2 = torch.where(states[None] > n, torch.inf, r)
    leaves = [x.clone().requires_grad_() for x in (pf2, pt2, r2)]
    dirty = fastgfn.subtb_loss(*leaves, lengths, reduction="none", backend=backend)
    assert torch.equal(clean, dirty)
    dirty.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inside_a_sequence_is_isolated(backend):
    device = device_for(backend)
    pf, pt, r, lengths = random_batch(3, 6, seed=4, lengths=[6, 6, 4], device=device)
    pf = pf.clone()
    pf[0, 2] = torch.nan
    r = r.clone()
    r[1, 3] = -torch.inf
    out = fastgfn.subtb_loss(pf, pt, r, lengths, reduction="none", backend=backend)
    assert torch.isnan(out[0]) and not torch.isfinite(out[1])
    ref = fastgfn.subtb_loss(pf[2:].double(), pt[2:].double(), r[2:].double(), lengths[2:],
                             reduction="none", backend="reference")
    assert_close(out[2:], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    pf, pt, r, lengths = random_batch(4, 9, seed=9, device=device)
    wide = [torch.stack([x, -x], dim=2)[..., 0] for x in (pf, pt, r)]  # stride 2 along time
    assert not wide[0].is_contiguous()
    got = fastgfn.subtb_loss(*wide, lengths, reduction="none", backend=backend)
    want = fastgfn.subtb_loss(pf, pt, r, lengths, reduction="none", backend="reference")
    assert_close(got, want)


def test_peaked_large_values_cpp():
    """Potentials of size 1e4 with O(1) residuals: centring keeps the C++ kernel exact."""
    pf, pt, r, lengths = random_batch(3, 50, seed=6, dtype=torch.float64)
    r = r - 1e4 * torch.arange(51, dtype=torch.float64)  # log_r falls 1e4 per token...
    pf = pf - 1e4  # ...and each token's log_pf compensates
    got = fastgfn.subtb_loss(pf, pt, r, lengths, reduction="none", backend="cpp")
    want = fastgfn.subtb_loss(pf, pt, r, lengths, reduction="none", backend="reference")
    assert_close(got, want, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Reductions, DB, TB, VarGrad
# --------------------------------------------------------------------------------------------


def test_reductions_definition():
    inputs = random_batch(5, 8, seed=12, lengths=[8, 0, 3, 1, 5], dtype=torch.float64)
    num, den = brute_force_pair_sums(*inputs, 0.9)
    per_seq = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)
    got = {r: fastgfn.subtb_loss(*inputs, 0.9, r) for r in ("mean", "seq_mean", "sum", "none")}
    assert_close(got["mean"], num.sum() / den.sum(), rtol=1e-12, atol=1e-12)
    assert_close(got["sum"], num.sum(), rtol=1e-12, atol=1e-12)
    assert_close(got["none"], per_seq, rtol=1e-12, atol=1e-12)
    assert_close(got["seq_mean"], per_seq.sum() / 4, rtol=1e-12, atol=1e-12)  # 4 non-empty


@pytest.mark.parametrize("backend", BACKENDS)
def test_db_loss_is_one_step_pairs(backend):
    device = device_for(backend)
    pf, pt, r, lengths = random_batch(5, 7, seed=13, device=device)
    total, count = 0.0, 0
    for b in range(5):
        for i in range(int(lengths[b])):
            res = float(r[b, i] + pf[b, i] + pt[b, i + 1] - r[b, i + 1] - pt[b, i])
            total += res * res
            count += 1
    got = fastgfn.db_loss(pf, pt, r, lengths, backend=backend)
    assert_close(got, torch.tensor(total / count), rtol=1e-5, atol=1e-5)


def test_tb_loss_and_log_z_gradient():
    pf, pt, r, lengths = random_batch(4, 6, seed=14, dtype=torch.float64)
    log_z = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = fastgfn.tb_loss(pf, pt, r, lengths, log_z)
    expected = []
    for b in range(4):
        n = int(lengths[b])
        res = float(log_z[b]) + sum(float(pf[b, t]) for t in range(n)) + float(pt[b, n] - r[b, n])
        expected.append(res * res)
    assert_close(loss, torch.tensor(expected, dtype=torch.float64).mean(), rtol=1e-12, atol=1e-12)
    loss.backward()
    residual = torch.tensor(expected, dtype=torch.float64).sqrt() * torch.sign(
        log_z.detach() + fastgfn.trajectory_log_ratio(pf, pt, r, lengths))
    assert_close(log_z.grad, 2 * residual / 4, rtol=1e-9, atol=1e-9)


def test_tb_module_learns_log_z():
    pf, pt, r, lengths = random_batch(8, 5, seed=15)
    module = fastgfn.TBLoss(num_prompts=2)
    prompt_ids = torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(module.parameters(), lr=0.2)
    for _ in range(200):
        opt.zero_grad()
        module(pf, pt, r, lengths, prompt_ids).backward()
        opt.step()
    ratio = fastgfn.trajectory_log_ratio(pf, pt, r, lengths)
    for p in (0, 1):  # optimum: log Z = -mean(ratio) within the prompt
        assert abs(float(module.log_z[p]) + float(ratio[prompt_ids == p].mean())) < 1e-3


def test_vargrad_loss_groups():
    pf, pt, r, lengths = random_batch(6, 5, seed=16, dtype=torch.float64)
    groups = torch.tensor([3, 3, 7, 7, 7, 9])
    pf = pf.clone().requires_grad_()
    loss = fastgfn.vargrad_loss(pf, pt, r, lengths, groups)
    x = [sum(float(pf[b, t]) for t in range(int(lengths[b]))) + float(pt[b, lengths[b]]
         - r[b, lengths[b]]) for b in range(6)]
    means = {3: (x[0] + x[1]) / 2, 7: (x[2] + x[3] + x[4]) / 3, 9: x[5]}
    expected = sum((x[b] - means[int(groups[b])]) ** 2 for b in range(6)) / 6
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    log_z = fastgfn.vargrad_log_z(pf, pt, r, lengths, groups)
    want = torch.tensor([-means[int(g)] for g in groups], dtype=torch.float64)
    assert_close(log_z, want, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert torch.isfinite(pf.grad).all()
    one_group = fastgfn.vargrad_loss(pf, pt, r, lengths, torch.full((6,), 4))
    assert_close(fastgfn.vargrad_loss(pf, pt, r, lengths), one_group, rtol=1e-12, atol=1e-12)
    assert_close(one_group, torch.tensor(x, dtype=torch.float64).var(unbiased=False),
                 rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_gradcheck_float64(backend, lam):
    pf, pt, r, lengths = random_batch(3, 6, seed=17, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (pf, pt, r)]

    def fn(a, b, c):
        return subtb_pair_sums(a, b, c, lengths, lam, backend)[0]

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    pf, pt, r, lengths = random_batch(3, 6, seed=18, device=device_for(backend))
    args = (pf.requires_grad_(), pt.requires_grad_(), r.requires_grad_(), lengths, 0.9, backend)
    torch.library.opcheck(torch.ops.fastgfn.subtb_pair_sums.default, args)
    grad = torch.randn(3, device=pf.device)
    torch.library.opcheck(torch.ops.fastgfn.subtb_pair_sums_backward.default,
                          (grad, pf.detach(), pt.detach(), r.detach(), lengths, 0.9, backend))


def test_torch_compile_fullgraph_cpu():
    pf, pt, r, lengths = random_batch(4, 9, seed=19)

    def step(a, b, c, n):
        return fastgfn.subtb_loss(a, b, c, n, lam=0.9) * 2.0 + fastgfn.db_loss(a, b, c, n)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (pf, pt, r)]
    out = compiled(*leaves, lengths)
    out.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (pf, pt, r)]
    step(*ref_leaves, lengths).backward()
    assert_close(out, step(pf, pt, r, lengths))
    for a, b in zip(leaves, ref_leaves):
        assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    pf, pt, r, lengths = random_batch(3, 5, seed=20)
    cases = [
        (dict(log_pterm=pt[:, :-1]), ValueError, "log_pterm"),
        (dict(log_r=r[:2]), ValueError, "log_r"),
        (dict(log_pf=pf[0]), ValueError, "log_pf"),
        (dict(lengths=lengths[:2]), ValueError, "lengths"),
        (dict(lengths=torch.tensor([0, 6, 1])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([0, -1, 1])), ValueError, "lengths"),
        (dict(lengths=lengths.float()), TypeError, "lengths"),
        (dict(lam=0.0), ValueError, "lam"),
        (dict(lam=-0.5), ValueError, "lam"),
        (dict(lam=math.nan), ValueError, "lam"),
        (dict(lam="1"), TypeError, "lam"),
        (dict(log_pf=pf.long()), TypeError, "log_pf"),
        (dict(log_r=r.int()), TypeError, "log_r"),
        (dict(log_pterm=[[0.0]]), TypeError, "log_pterm"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    base = dict(log_pf=pf, log_pterm=pt, log_r=r, lengths=lengths, lam=1.0, reduction="mean")
    for override, exc, name in cases:
        kwargs = {**base, **override}
        with pytest.raises(exc, match=name):
            fastgfn.subtb_loss(**kwargs)
    with pytest.raises(ValueError, match="log_z"):
        fastgfn.tb_loss(pf, pt, r, lengths, torch.zeros(2))
    with pytest.raises(ValueError, match="group_ids"):
        fastgfn.vargrad_loss(pf, pt, r, lengths, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="lam"):
        fastgfn.SubTBLoss(lam=0)
    with pytest.raises(ValueError, match="num_prompts"):
        fastgfn.TBLoss(num_prompts=0)


def test_wrong_device_is_rejected():
    pf, pt, r, lengths = random_batch(2, 3, seed=21)
    with pytest.raises(ValueError, match="log_r"):
        fastgfn.subtb_loss(pf, pt, r.to("meta"), lengths)


def test_lengths_as_list_and_int32():
    pf, pt, r, _ = random_batch(3, 4, seed=22)
    a = fastgfn.subtb_loss(pf, pt, r, [4, 0, 2])
    b = fastgfn.subtb_loss(pf, pt, r, torch.tensor([4, 0, 2], dtype=torch.int32))
    assert_close(a, b)


@pytest.mark.parametrize("grouped", [True, False])
def test_vargrad_non_finite_row_leaves_the_rest_of_its_group_alone(grouped):
    """A non-finite log ratio makes its own row's loss non-finite; the other rows of its group
    get the values and gradients of the batch without that row (issue 11)."""
    pf, pt, r, lengths = random_batch(6, 5, seed=24, lengths=[5, 3, 4, 2, 5, 1],
                                      dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1]) if grouped else None
    r = r.clone()
    r[1, 3] = torch.inf  # x_1 = -inf
    pf = pf.clone()
    pf[4, 0] = torch.nan  # x_4 = nan
    keep = torch.tensor([0, 2, 3, 5])
    leaves = [x.clone().requires_grad_() for x in (pf, pt, r)]
    got = fastgfn.vargrad_loss(*leaves, lengths, groups, reduction="none")
    assert not torch.isfinite(got[1]) and torch.isnan(got[4])
    got[keep].sum().backward()
    clean = [x[keep].clone().requires_grad_() for x in (pf, pt, r)]
    want = fastgfn.vargrad_loss(*clean, lengths[keep], None if groups is None else groups[keep],
                                reduction="none")
    want.sum().backward()
    assert_close(got[keep], want, rtol=1e-12, atol=1e-12)
    for leaf, ref in zip(leaves, clean):  # (rows 1 and 4 get their own NaN gradients)
        assert torch.isfinite(leaf.grad[keep]).all()
        assert_close(leaf.grad[keep], ref.grad, rtol=1e-12, atol=1e-12)
    log_z = fastgfn.vargrad_log_z(pf, pt, r, lengths, groups)
    want_z = fastgfn.vargrad_log_z(pf[keep], pt[keep], r[keep], lengths[keep],
                                   None if groups is None else groups[keep])
    assert torch.isfinite(log_z).all()
    assert_close(log_z[keep], want_z, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# lam > 1: weights grow with the pair's length (issue 11)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.3, 3.0])
def test_lam_above_one_matches_brute_force(backend, lam):
    """The op's sums are scaled by lam^-(n-1) for lam > 1; every reduction undoes it."""
    device = device_for(backend)
    inputs = random_batch(5, 9, seed=31, lengths=[9, 0, 4, 1, 7], device=device)
    num, den = brute_force_pair_sums(*[t.cpu() for t in inputs], lam)
    scale = pair_sums_log_scale(inputs[3].cpu(), lam, torch.float64).exp()
    rnum, rden = subtb_pair_sums_reference(*[t.cpu() for t in inputs], lam)
    assert_close(rnum * scale, num, rtol=1e-12, atol=1e-12, what="reference num")
    assert_close(rden * scale, den, rtol=1e-12, atol=1e-12, what="reference den")
    per_seq = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)
    want = {"mean": num.sum() / den.sum(), "sum": num.sum(), "none": per_seq,
            "seq_mean": per_seq.sum() / 4}
    for reduction, value in want.items():
        got = fastgfn.subtb_loss(*inputs, lam, reduction, backend=backend)
        assert_close(got, value, rtol=2e-5, atol=1e-5, what=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.01, 1.5, 8.0])
def test_lam_above_one_long_sequences_do_not_overflow(backend, lam):
    """lam^(T-1) overflows fp32 (and for lam = 8 fp64) at T = 600; losses stay finite and all
    backends agree with the float64 reference, values and gradients."""
    T = 600
    check_backend_against_reference(backend, 3, T, lam, seed=41)
    device = device_for(backend)
    inputs = random_batch(3, T, seed=43, lengths=[T, 517, 3], device=device)
    for reduction in ("mean", "seq_mean", "none"):
        leaves = [t.clone().requires_grad_() for t in inputs[:3]]
        got = fastgfn.subtb_loss(*leaves, inputs[3], lam, reduction, backend=backend)
        got.sum().backward()
        ref_leaves = [t.detach().double().cpu().requires_grad_() for t in inputs[:3]]
        want = fastgfn.subtb_loss(*ref_leaves, inputs[3].cpu(), lam, reduction,
                                  backend="reference")
        want.sum().backward()
        assert torch.isfinite(got).all(), reduction
        assert_close(got, want, rtol=2e-5, atol=1e-5, what=reduction)
        for leaf, ref in zip(leaves, ref_leaves):
            assert torch.isfinite(leaf.grad).all(), reduction
            assert_close(leaf.grad, ref.grad, rtol=2e-4, atol=2e-6, what=f"{reduction} grad")
