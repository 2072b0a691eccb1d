"""Shared cases and checks for the per-token log-prob tests (every backend vs float64).

The oracle is ``fastgfn.reference.logprobs`` run in float64 with autograd. The tolerance rule
(docs/MATH.md §1, Precision): our error against float64 must be at most twice PyTorch's own
error at the input dtype (the same eager maths run in that dtype), plus a small atol.
"""

from __future__ import annotations

import torch

from fastgfn.ops.logprobs import linear_token_logprobs, token_logprobs
from fastgfn.reference.logprobs import linear_token_logprobs_reference, token_logprobs_reference

# (absolute, relative-to-the-largest-value) slack added to the 2x rule
ATOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.bfloat16: (1e-3, 1e-3),
    torch.float16: (1e-3, 1e-3),
}
NEG_INF = float("-inf")


def make_logits_case(
    N, V, *, seed, peaked=True, bias=False, ignore=0.2, n_extra=2, all_ignored=False, scale=3.0
):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, V, (N,), generator=g)
    extra = torch.randint(0, V, (n_extra,), generator=g)
    vocab_bias = None
    if bias:
        vocab_bias = torch.zeros(V, dtype=torch.float64)
        forbidden = torch.randperm(V, generator=g)[: max(1, V // 5)]
        vocab_bias[forbidden] = NEG_INF
        vocab_bias[torch.randperm(V, generator=g)[: max(1, V // 7)]] -= 50.0
        allowed = torch.nonzero(vocab_bias > NEG_INF).flatten()
        target = allowed[torch.randint(0, allowed.numel(), (N,), generator=g)]
        extra = allowed[torch.randint(0, allowed.numel(), (n_extra,), generator=g)]
    if peaked:
        logits[0, target[0]] = 1e4  # a confident row
        if N > 1:
            logits[-1] = -1e4
            logits[-1, target[-1]] = 1e4
    drop = torch.rand(N, generator=g) < ignore
    if all_ignored:
        drop[:] = True
    target = torch.where(drop, torch.full_like(target, -100), target)
    return logits, target, extra, vocab_bias


def make_linear_case(N, V, H, *, seed, peaked=True, with_bias=True, peak_scale=3000.0, **kw):
    g = torch.Generator().manual_seed(seed + 7)
    _, target, extra, vocab_bias = make_logits_case(N, V, seed=seed, peaked=False, **kw)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    if peaked:
        hidden[0] *= peak_scale  # logits of thousands, up to ~1e4: a confident row
    return hidden, weight, bias, target, extra, vocab_bias


def _outputs(out):
    return [o for o in (out.logp, out.extra, out.entropy, out.lse) if o is not None]


def _run(fn, tensors, grads_seed, **kw):
    leaves = [
        t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
        for t in tensors
    ]
    out = fn(*leaves, **kw)
    outs = _outputs(out)
    g = torch.Generator().manual_seed(grads_seed)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [gr.to(o.dtype).to(o.device) for gr, o in zip(grads, outs)])
    return outs, [t.grad if t is not None else None for t in leaves], grads


def _err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def check_against_reference(kind, backend, tensors, options, dtype, device="cpu", seed=0,
                            weight_dtype=None):
    """Values and gradients of ``backend`` vs float64, with the 2x-PyTorch rule at ``dtype``.

    ``tensors``: (logits, target, extra) or (hidden, weight, bias, target, extra), float64.
    ``weight_dtype`` (linear only): the weight and bias in that dtype, hidden in ``dtype`` --
    mixed precision's fp32 master weights, held to PyTorch's error with all of them in
    ``dtype`` (what autocast computes); their gradients must come back in ``weight_dtype``.
    """
    opts = dict(options)
    if kind == "logits":
        logits, target, extra = tensors
        float_in = [logits]
        ref_fn = lambda lg, compute_dtype: token_logprobs_reference(  # noqa: E731
            lg, target, extra, compute_dtype=compute_dtype, **_ref_opts(opts)
        )
        our_fn = lambda lg: token_logprobs(
            lg,
            target.to(device),
            extra.to(device),  # noqa: E731
            backend=backend,
            **_dev_opts(opts, device),
        )
    else:
        hidden, weight, bias, target, extra = tensors
        float_in = [hidden, weight, bias]
        ref_fn = lambda h, w, b, compute_dtype: linear_token_logprobs_reference(  # noqa: E731
            h, w, target, b, extra, compute_dtype=compute_dtype, **_ref_opts(opts)
        )
        our_fn = lambda h, w, b: linear_token_logprobs(  # noqa: E731
            h, w, target.to(device), b, extra.to(device), backend=backend, **_dev_opts(opts, device)
        )
    want_entropy = bool(opts.get("return_entropy"))
    want_lse = bool(opts.get("return_lse"))

    def as_out(o):
        return (
            [o.logp, o.extra]
            + ([o.entropy] if want_entropy else [])
            + ([o.lse] if want_lse else [])
        )

    # float64 oracle
    exact_in = [t.double() if t is not None else None for t in float_in]
    exact_out, exact_grads, grads = _run(
        lambda *a: _wrap(as_out(ref_fn(*a, compute_dtype=torch.float64))), exact_in, seed
    )
    # PyTorch's own maths at dtype
    low_in = [t.to(dtype) if t is not None else None for t in float_in]
    torch_out, torch_grads, _ = _run(
        lambda *a: _wrap(as_out(ref_fn(*a, compute_dtype=dtype))), low_in, seed
    )
    # ours at dtype
    in_dtypes = [dtype] * len(float_in)
    if weight_dtype is not None:
        assert kind == "linear"
        in_dtypes[1:] = [weight_dtype, weight_dtype]
    our_in = [t.to(d).to(device) if t is not None else None for t, d in zip(float_in, in_dtypes)]
    our_out, our_grads, _ = _run(our_fn, our_in, seed)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    names = (
        ["logp", "extra"] + (["entropy"] if want_entropy else []) + (["lse"] if want_lse else [])
    )
    assert len(our_out) == len(exact_out)
    for name, ours, exact, theirs in zip(names, our_out, exact_out, torch_out):
        assert ours.dtype == expected_dtype, (name, ours.dtype)
        assert ours.shape == exact.shape, (name, ours.shape, exact.shape)
        e_ours, e_torch = _err(ours, exact), _err(theirs, exact)
        assert e_ours <= 2 * e_torch + _atol(dtype, exact), (
            f"{name}: error {e_ours:.3g} vs PyTorch's {e_torch:.3g} at {dtype}"
        )
    for i, (ours, exact, theirs) in enumerate(zip(our_grads, exact_grads, torch_grads)):
        if exact is None:
            assert ours is None
            continue
        assert ours is not None, f"no gradient for input {i}"
        assert ours.dtype == in_dtypes[i] and ours.shape == exact.shape, (i, ours.dtype)
        e_ours, e_torch = _err(ours, exact), _err(theirs, exact)
        assert e_ours <= 2 * e_torch + _atol(dtype, exact), (
            f"grad of input {i}: error {e_ours:.3g} vs PyTorch's {e_torch:.3g} at {dtype}"
        )
    return our_out, exact_out, grads


def _atol(dtype, exact):
    # a small absolute slack relative to the magnitude of the values compared
    finite = exact[torch.isfinite(exact)] if exact.numel() else exact
    scale = float(finite.detach().abs().max()) if finite.numel() else 1.0
    abs_tol, rel_tol = ATOL[dtype]
    return abs_tol + rel_tol * scale


class _Out:
    def __init__(self, outs):
        self.logp, self.extra, self.entropy, self.lse = (outs + [None, None])[:4]


def _wrap(outs):
    return _Out(list(outs))


def _ref_opts(opts):
    keys = ("temperature", "vocab_bias", "softcap", "ignore_index")
    return {k: v for k, v in opts.items() if k in keys}


def _dev_opts(opts, device):
    out = dict(opts)
    if out.get("vocab_bias") is not None:
        out["vocab_bias"] = out["vocab_bias"].float().to(device)
    return out


def zero_row_linear_grads(backend, device="cpu", dtype=torch.float32):
    """(d hidden, d weight, d bias) of the fused-linear op on N = 0 rows, after recycling
    NaN-filled memory of the gradients' size (so that an unwritten gradient shows)."""
    g = torch.Generator().manual_seed(61)
    H, V = 24, 300
    w = torch.randn(V, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(device=device, dtype=dtype).requires_grad_()
    h = torch.zeros(0, H, device=device, dtype=dtype, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    for _ in range(3):  # recycle freed memory of the gradients' size, full of NaN
        junk = torch.full((V, H), torch.nan, device=device, dtype=dtype)
        junk_b = torch.full((V,), torch.nan, device=device, dtype=dtype)
        del junk, junk_b
    out = linear_token_logprobs(h, w, target, b, [3], return_entropy=True, return_lse=True,
                                backend=backend)
    assert out.logp.shape == (0,) and out.extra.shape == (0, 1)
    (out.logp.sum() + out.extra.sum() + out.entropy.sum() + out.lse.sum()).backward()
    return h.grad, w.grad, b.grad



def check_out_of_range_ids(backend, device="cpu", linear=False):
    """Out-of-range ids with the value checks bypassed (the registered op called directly):
    NaN for the outputs that name them, no gradient from them, every other output and
    gradient as in the clean call without them (docs/MATH.md §1)."""
    from fastgfn.ops.logprobs_ops import linear_token_logprobs_op, token_logprobs_op

    g = torch.Generator().manual_seed(71)
    N, V, H = 6, 40, 8
    target = torch.tensor([3, V + 2, -100, -7, 0, V - 1])
    extra = torch.tensor([1, V + 5, -3, V - 1])
    bad_rows, ok_cols = torch.tensor([1, 3]), torch.tensor([0, 3])
    clean_target = target.clone()
    clean_target[bad_rows] = -100
    if linear:
        inputs = [torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), None]
        op = linear_token_logprobs_op
    else:
        inputs = [torch.randn(N, V, generator=g) * 3]
        op = token_logprobs_op
    grads = [torch.randn(N, generator=g), torch.randn(N, 4, generator=g),
             torch.randn(N, generator=g), torch.randn(N, generator=g)]

    def run(t, e, gr):
        leaves = [x.to(device).requires_grad_() if x is not None else None for x in inputs]
        out = op(*leaves, t.to(device), e.to(device), None, 0.9, 0.0, -100, True, backend)
        torch.autograd.backward(list(out), [x.to(device) for x in gr])
        return [o.detach().cpu() for o in out], [x.grad.cpu() for x in leaves if x is not None]

    out, dx = run(target, extra, grads)
    clean_grads = [grads[0], grads[1][:, ok_cols], grads[2], grads[3]]
    clean, clean_dx = run(clean_target, extra[ok_cols], clean_grads)
    logp, ext, ent, lse = out
    assert torch.isnan(logp[bad_rows]).all() and logp[2] == 0
    good_rows = torch.tensor([0, 2, 4, 5])
    torch.testing.assert_close(logp[good_rows], clean[0][good_rows])
    assert torch.isnan(ext[:, [1, 2]]).all()
    torch.testing.assert_close(ext[:, ok_cols], clean[1])
    torch.testing.assert_close(ent, clean[2])
    torch.testing.assert_close(lse, clean[3])
    for a, b in zip(dx, clean_dx):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
