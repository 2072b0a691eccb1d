"""Per-token log-probs (from logits and fused with the lm_head): reference and C++ backends
against float64, values and gradients; registration, compile, no-grad path, bad input."""

from __future__ import annotations

import pytest
import torch

import fastgfn
from fastgfn.ops.logprobs import (
    LinearTokenLogProbs,
    TokenLogProbsLayer,
    linear_token_logprobs,
    token_logprobs,
)
from fastgfn.ops.logprobs_ops import (
    linear_token_logprobs_backward_op,
    linear_token_logprobs_op,
    token_logprobs_backward_op,
    token_logprobs_op,
)
from fastgfn.reference.logprobs import (
    linear_token_logprobs_backward_reference,
    linear_token_logprobs_reference,
    token_logprobs_backward_reference,
    token_logprobs_reference,
)

from .logprobs_cases import (
    check_against_reference,
    check_out_of_range_ids,
    make_linear_case,
    make_logits_case,
    zero_row_linear_grads,
)

CPU_BACKENDS = ["reference", "cpp"]

OPTION_SETS = {
    "plain": dict(),
    "tau_bias_lse": dict(temperature=0.7, bias=True, return_lse=True),
    "softcap_entropy": dict(softcap=5.0, return_entropy=True, return_lse=True),
    "all": dict(temperature=1.7, bias=True, softcap=30.0, return_entropy=True, return_lse=True),
}


def _split(opts):
    case_kw = {"bias": opts.get("bias", False)}
    fn_kw = {k: v for k, v in opts.items() if k != "bias"}
    return case_kw, fn_kw


# --------------------------------------------------------------------------------------------
# The reference's hand-written backward against autograd through the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", list(OPTION_SETS))
def test_reference_backward_matches_autograd(opts):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    logits, target, extra, vb = make_logits_case(9, 37, seed=1, **case_kw)
    kw = dict(
        temperature=fn_kw.get("temperature", 1.0), vocab_bias=vb, softcap=fn_kw.get("softcap")
    )
    x = logits.clone().requires_grad_()
    out = token_logprobs_reference(x, target, extra, **kw)
    g = [torch.randn_like(o) for o in out]
    torch.autograd.backward(list(out), g)
    manual = token_logprobs_backward_reference(*g, logits, target, extra, **kw)
    torch.testing.assert_close(manual, x.grad, rtol=1e-9, atol=1e-9)
    # and the linear variant's chain rule
    h, w, b, target, extra, vb = make_linear_case(5, 23, 7, seed=2, **case_kw)
    kw["vocab_bias"] = vb
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = linear_token_logprobs_reference(leaves[0], leaves[1], target, leaves[2], extra, **kw)
    g = [torch.randn_like(o) for o in out]
    torch.autograd.backward(list(out), g)
    manual = linear_token_logprobs_backward_reference(*g, h, w, target, b, extra, **kw)
    for m, leaf in zip(manual, leaves):
        torch.testing.assert_close(m, leaf.grad, rtol=1e-9, atol=1e-9)


def test_reference_matches_log_softmax():
    logits, target, extra, _ = make_logits_case(6, 11, seed=3, peaked=False, ignore=0.0)
    out = token_logprobs_reference(logits, target, extra)
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logp, lsm.gather(1, target[:, None]).squeeze(1))
    torch.testing.assert_close(out.extra, lsm[:, extra])
    torch.testing.assert_close(out.entropy, -(lsm.exp() * lsm).sum(-1))
    torch.testing.assert_close(out.lse, torch.logsumexp(logits, -1))


# --------------------------------------------------------------------------------------------
# Backends against float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("opts", list(OPTION_SETS))
@pytest.mark.parametrize("N,V", [(1, 5), (3, 1000), (257, 5), (257, 1000)])
def test_logits_fp32(backend, opts, N, V):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    logits, target, extra, vb = make_logits_case(N, V, seed=N * 31 + V, **case_kw)
    check_against_reference(
        "logits",
        backend,
        (logits, target, extra),
        dict(fn_kw, vocab_bias=vb),
        torch.float32,
        seed=N + V,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("opts", ["tau_bias_lse", "softcap_entropy"])
def test_logits_dtypes(backend, dtype, opts):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    peaked = dtype != torch.float16  # 1e4 is fine in fp16 but its softmax maths is not the point
    logits, target, extra, vb = make_logits_case(37, 300, seed=5, peaked=peaked, **case_kw)
    check_against_reference(
        "logits", backend, (logits, target, extra), dict(fn_kw, vocab_bias=vb), dtype, seed=9
    )


def test_logits_large_vocab_cpp():
    logits, target, extra, vb = make_logits_case(3, 50257, seed=11, bias=True)
    check_against_reference(
        "logits",
        "cpp",
        (logits, target, extra),
        dict(temperature=0.9, vocab_bias=vb, return_entropy=True, return_lse=True),
        torch.float32,
        seed=3,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("opts", list(OPTION_SETS))
@pytest.mark.parametrize(
    "N,V,H", [(1, 5, 16), (3, 1000, 16), (257, 1000, 16), (257, 5, 576), (3, 1000, 576)]
)
def test_linear_fp32(backend, opts, N, V, H):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    h, w, b, target, extra, vb = make_linear_case(N, V, H, seed=N + V + H, **case_kw)
    check_against_reference(
        "linear",
        backend,
        (h, w, b, target, extra),
        dict(fn_kw, vocab_bias=vb),
        torch.float32,
        seed=N * V,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_dtypes(backend, dtype):
    h, w, b, target, extra, vb = make_linear_case(37, 300, 16, seed=13, bias=True)
    check_against_reference(
        "linear",
        backend,
        (h, w, b, target, extra),
        dict(temperature=0.8, vocab_bias=vb, softcap=20.0, return_entropy=True, return_lse=True),
        dtype,
        seed=4,
    )


def test_linear_large_vocab_cpp_no_bias():
    h, w, _, target, extra, vb = make_linear_case(3, 50257, 16, seed=17, with_bias=False)
    check_against_reference(
        "linear",
        "cpp",
        (h, w, None, target, extra),
        dict(return_entropy=True, return_lse=True),
        torch.float32,
        seed=5,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored_batch(backend):
    logits, target, extra, _ = make_logits_case(5, 40, seed=19, all_ignored=True)
    our, exact, _ = check_against_reference(
        "logits", backend, (logits, target, extra), dict(return_lse=True), torch.float32, seed=1
    )
    assert torch.all(our[0] == 0)
    h, w, b, target, extra, _ = make_linear_case(5, 40, 8, seed=19, all_ignored=True)
    x = h.float().requires_grad_()
    out = linear_token_logprobs(x, w.float(), target, b.float(), backend=backend)
    assert torch.all(out.logp == 0) and out.extra.shape == (5, 0)
    out.logp.sum().backward()
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_rows_get_no_target_gradient_but_keep_extras(backend):
    logits, target, extra, _ = make_logits_case(6, 50, seed=23, ignore=0.0)
    target[2] = -1
    x = logits.float().requires_grad_()
    out = token_logprobs(x, target, extra, ignore_index=-1, backend=backend)
    assert out.logp[2] == 0
    ref = torch.log_softmax(logits, -1)[2, extra]
    torch.testing.assert_close(out.extra[2].double(), ref, rtol=1e-5, atol=1e-5)
    out.logp.sum().backward()
    assert torch.all(x.grad[2] == 0) and torch.any(x.grad[1] != 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dims_and_int_extra(backend):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 17, generator=g)
    target = torch.randint(0, 17, (2, 3), generator=g)
    out = token_logprobs(logits, target, 4, return_entropy=True, backend=backend)
    assert out.logp.shape == (2, 3) and out.extra.shape == (2, 3, 1)
    assert out.entropy.shape == (2, 3) and out.lse is None
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.extra[..., 0], lsm[..., 4])
    h = torch.randn(2, 3, 8, generator=g)
    w = torch.randn(17, 8, generator=g)
    out = linear_token_logprobs(h, w, target, extra_ids=[4, 5], backend=backend)
    torch.testing.assert_close(out.extra, torch.log_softmax(h @ w.T, -1)[..., [4, 5]])


def test_cpp_matches_reference_backend_across_tiles():
    """Tile edges (256 rows x 512 columns) and vocabulary-group splits are exact merges."""
    h, w, b, target, extra, vb = make_linear_case(600, 1500, 24, seed=29, bias=True)
    args = [t.float() for t in (h, w)]
    kw = dict(vocab_bias=vb.float(), return_entropy=True, return_lse=True, temperature=1.1)
    a = linear_token_logprobs(*args, target, b.float(), extra, backend="cpp", **kw)
    r = linear_token_logprobs(*args, target, b.float(), extra, backend="reference", **kw)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backward_row_blocks(monkeypatch, dtype):
    """The backward walks rows in blocks (bounded per-thread dh buffers); force 3 blocks."""
    monkeypatch.setenv("FASTGFN_LOGPROBS_ROW_BLOCK", "256")
    h, w, b, target, extra, vb = make_linear_case(600, 700, 24, seed=59, bias=True)
    check_against_reference(
        "linear",
        "cpp",
        (h, w, b, target, extra),
        dict(vocab_bias=vb, softcap=10.0, return_entropy=True, return_lse=True),
        dtype,
        seed=6,
    )


# --------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, the no-grad path
# --------------------------------------------------------------------------------------------


def _op_args(backend, dtype=torch.float32):
    logits, target, extra, vb = make_logits_case(7, 33, seed=31, bias=True)
    return logits.to(dtype), target, extra, vb.float(), 0.8, 4.0, -100, True, backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_token_logprobs(backend):
    args = list(_op_args(backend))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(token_logprobs_op, tuple(args))
    logits = args[0].detach()
    logp, extra, ent, lse = token_logprobs_op(*[a if i else logits for i, a in enumerate(args)])
    g = torch.randn(7)
    bargs = (
        g,
        torch.randn(7, 2),
        torch.randn(7),
        torch.randn(7),
        logits,
        args[1],
        args[2],
        args[3],
        lse,
        ent,
        0.8,
        4.0,
        -100,
        backend,
    )
    torch.library.opcheck(token_logprobs_backward_op, bargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_linear_token_logprobs(backend):
    h, w, b, target, extra, vb = make_linear_case(7, 33, 8, seed=37, bias=True)
    args = (
        h.float().requires_grad_(),
        w.float().requires_grad_(),
        b.float().requires_grad_(),
        target,
        extra,
        vb.float(),
        0.8,
        4.0,
        -100,
        True,
        backend,
    )
    torch.library.opcheck(linear_token_logprobs_op, args)
    _, _, ent, lse = linear_token_logprobs_op(
        *[a.detach() if torch.is_tensor(a) else a for a in args]
    )
    bargs = (
        torch.randn(7),
        torch.randn(7, 2),
        torch.randn(7),
        torch.randn(7),
        h.float(),
        w.float(),
        b.float(),
        target,
        extra,
        vb.float(),
        lse,
        ent,
        0.8,
        4.0,
        -100,
        True,
        True,
        True,
        backend,
    )
    torch.library.opcheck(linear_token_logprobs_backward_op, bargs)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, w, b, target, extra, vb = make_linear_case(9, 41, 8, seed=41, bias=True)
    h, w, b, vb = h.float(), w.float(), b.float(), vb.float()

    def f(h, w, b, logits):
        a = linear_token_logprobs(
            h,
            w,
            target,
            b,
            extra,
            vocab_bias=vb,
            temperature=0.9,
            return_entropy=True,
            backend="cpp",
        )
        c = token_logprobs(logits, target, extra, softcap=5.0, backend="cpp")
        return a.logp.sum() + a.extra.sum() + a.entropy.sum() + c.logp.sum() + c.extra.sum()

    logits = torch.randn(9, 41)
    leaves = [t.clone().requires_grad_() for t in (h, w, b, logits)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    loss.backward()
    eager_leaves = [t.clone().requires_grad_() for t in (h, w, b, logits)]
    eager = f(*eager_leaves)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for a, e in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, e.grad)


def _count_saved(fn):
    count = []

    def pack(t):
        count.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_path_saves_nothing(backend):
    h, w, b, target, extra, _ = make_linear_case(6, 50, 8, seed=43)
    h, w = h.float(), w.float()
    run = lambda: linear_token_logprobs(h, w, target, extra_ids=extra, backend=backend)  # noqa
    assert _count_saved(run) == []  # inputs do not require grad
    hg = h.clone().requires_grad_()
    run_grad = lambda: linear_token_logprobs(hg, w, target, extra_ids=extra, backend=backend)  # noqa
    with torch.no_grad():
        assert _count_saved(run_grad) == []
    saved = _count_saved(run_grad)
    # the inputs themselves and per-row statistics, never anything [N, V]-sized
    assert saved and max(saved) <= max(h.numel(), w.numel()) and 6 * 50 not in saved


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _good():
    return torch.randn(4, 10), torch.tensor([1, 2, 3, -100]), torch.randn(4, 6), torch.randn(10, 6)


@pytest.mark.parametrize(
    "call,exc,word",
    [
        (lambda L, t, h, w: token_logprobs(L, t[:3]), ValueError, "target"),
        (lambda L, t, h, w: token_logprobs(L, torch.tensor([1, 2, 10, 0])), ValueError, "target"),
        (lambda L, t, h, w: token_logprobs(L, torch.tensor([1, 2, -5, 0])), ValueError, "target"),
        (lambda L, t, h, w: token_logprobs(L, t.float()), TypeError, "target"),
        (lambda L, t, h, w: token_logprobs(L.long(), t), TypeError, "logits"),
        (lambda L, t, h, w: token_logprobs(L[0], t), ValueError, "logits"),
        (lambda L, t, h, w: token_logprobs(L, t, [3, 10]), ValueError, "extra_ids"),
        (lambda L, t, h, w: token_logprobs(L, t, [0.5]), TypeError, "extra_ids"),
        (lambda L, t, h, w: token_logprobs(L, t, temperature=-1.0), ValueError, "temperature"),
        (lambda L, t, h, w: token_logprobs(L, t, temperature=0), ValueError, "temperature"),
        (lambda L, t, h, w: token_logprobs(L, t, softcap=-3.0), ValueError, "softcap"),
        (
            lambda L, t, h, w: token_logprobs(L, t, vocab_bias=torch.zeros(9)),
            ValueError,
            "vocab_bias",
        ),
        (
            lambda L, t, h, w: token_logprobs(L, t, vocab_bias=torch.zeros(10, dtype=torch.long)),
            TypeError,
            "vocab_bias",
        ),
        (lambda L, t, h, w: token_logprobs(L, t, backend="cuda"), ValueError, "backend"),
        (lambda L, t, h, w: linear_token_logprobs(h, w[:, :5], t), ValueError, "weight"),
        (lambda L, t, h, w: linear_token_logprobs(h, w.bfloat16(), t), TypeError, "weight"),
        (lambda L, t, h, w: linear_token_logprobs(h, w, t, torch.zeros(9)), ValueError, "bias"),
        (
            lambda L, t, h, w: linear_token_logprobs(h, w, t, torch.zeros(10).double()),
            TypeError,
            "bias",
        ),
        (
            lambda L, t, h, w: linear_token_logprobs(h, w, torch.tensor([0, 1, 2, 10])),
            ValueError,
            "target",
        ),
        (lambda L, t, h, w: linear_token_logprobs(h, w, t[:2]), ValueError, "target"),
        (
            lambda L, t, h, w: linear_token_logprobs(h, w, t, temperature=-0.5),
            ValueError,
            "temperature",
        ),
        (lambda L, t, h, w: linear_token_logprobs(h.int(), w, t), TypeError, "hidden"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call(*_good())


def test_modules_and_exports():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)
    t = torch.tensor([1, 2, 3, -100])
    mod = LinearTokenLogProbs(extra_ids=[9], temperature=0.5, return_entropy=True)
    out = mod(h, w, t)
    ref = linear_token_logprobs(h, w, t, extra_ids=[9], temperature=0.5, return_entropy=True)
    for a, r in zip(out, ref):
        assert (a is None and r is None) or torch.equal(a, r)
    lay = TokenLogProbsLayer(extra_ids=[9], softcap=3.0)
    torch.testing.assert_close(
        lay(h @ w.T, t).logp, token_logprobs(h @ w.T, t, [9], softcap=3.0).logp
    )
    assert fastgfn.linear_token_logprobs is linear_token_logprobs
    assert fastgfn.token_logprobs is token_logprobs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    logits, target, extra, vb = make_logits_case(4, 13, seed=47, bias=True, peaked=False)

    def f(lg):
        out = token_logprobs(
            lg,
            target,
            extra,
            vocab_bias=vb,
            softcap=4.0,
            temperature=0.8,
            return_entropy=True,
            return_lse=True,
            backend=backend,
        )
        return out.logp, out.extra, out.entropy, out.lse

    torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),))
    h, w, b, target, extra, vb = make_linear_case(4, 13, 5, seed=53, bias=True, peaked=False)

    def g(h, w, b):
        out = linear_token_logprobs(
            h,
            w,
            target,
            b,
            extra,
            vocab_bias=vb,
            softcap=4.0,
            temperature=1.3,
            return_entropy=True,
            return_lse=True,
            backend=backend,
        )
        return out.logp, out.extra, out.entropy, out.lse

    torch.autograd.gradcheck(g, tuple(t.clone().requires_grad_() for t in (h, w, b)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_zero_rows_give_zero_weight_gradients(backend):
    """N = 0 tokens: the weight and bias gradients are exactly zero (issue 11: the C++
    backend returned uninitialised memory)."""
    for _ in range(5):
        dh, dw, db = zero_row_linear_grads(backend)
        assert dh.shape == (0, 24)
        assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("linear", [False, True])
def test_out_of_range_ids_without_value_checks(backend, linear):
    """Issue 11: with the value checks bypassed, every backend gives NaN for an output whose
    id is out of range (the C++ backend used to give -lse) and no gradient from it."""
    check_out_of_range_ids(backend, linear=linear)


def test_out_of_range_target_under_compile_is_nan():
    """torch.compile skips the value checks: the op's own contract applies."""
    torch._dynamo.reset()
    logits = torch.randn(3, 11)
    target = torch.tensor([2, 11, -100])
    f = torch.compile(lambda x, t: token_logprobs(x, t, [4], backend="cpp"), fullgraph=True,
                      backend="aot_eager")
    out = f(logits, target)
    assert torch.isnan(out.logp[1]) and out.logp[2] == 0 and torch.isfinite(out.logp[0])
    with pytest.raises(ValueError, match="target"):
        token_logprobs(logits, target, [4], backend="cpp")
