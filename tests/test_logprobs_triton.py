"""Triton kernels of the per-token log-prob ops against float64: values and gradients.

In CI they run through the Triton interpreter (tiny shapes: it is hundreds of times slower
than eager); with FASTGFN_TEST_NATIVE_TRITON=1 on a GPU the same tests run natively. The
sm_90 compile check of every kernel configuration is in test_triton_aot.py.
"""

from __future__ import annotations

import pytest
import torch

from fastgfn.ops.logprobs import (
    linear_token_logprobs,
    token_logprobs,
)
from fastgfn.ops.logprobs_ops import (
    linear_token_logprobs_backward_op,
    linear_token_logprobs_op,
    token_logprobs_backward_op,
    token_logprobs_op,
)

from .conftest import requires_triton, triton_device
from .logprobs_cases import (
    check_against_reference,
    check_out_of_range_ids,
    make_linear_case,
    make_logits_case,
    zero_row_linear_grads,
)

pytestmark = requires_triton

FULL = dict(temperature=0.7, bias=True, softcap=20.0, return_entropy=True, return_lse=True)
OPTION_SETS = {"plain": dict(), "full": FULL}


# Confident rows of the fused-linear cases: logits up to ~1e3 here (1e4 in the C++ tests). At
# 1e4 the logits are sums of products of ~1e3 that cancel, and the interpreter's fp32 dot sums
# them in another order than MKL: both are at the fp32 noise floor (~1e-5 relative), so the
# "2x PyTorch's error" rule would compare two equally valid roundings. The from-logits cases
# keep their exact +-1e4 rows.
PEAK = 300.0


def _split(opts):
    return {"bias": opts.get("bias", False)}, {k: v for k, v in opts.items() if k != "bias"}


@pytest.mark.parametrize("opts", list(OPTION_SETS))
@pytest.mark.parametrize("N,V", [(1, 5), (3, 1000), (257, 1000)])
def test_triton_logits_fp32(opts, N, V):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    logits, target, extra, vb = make_logits_case(N, V, seed=N + 3 * V, **case_kw)
    check_against_reference(
        "logits",
        "triton",
        (logits, target, extra),
        dict(fn_kw, vocab_bias=vb),
        torch.float32,
        device=triton_device(),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_logits_low_precision(dtype):
    case_kw, fn_kw = _split(FULL)
    logits, target, extra, vb = make_logits_case(37, 300, seed=7, peaked=False, **case_kw)
    check_against_reference(
        "logits",
        "triton",
        (logits, target, extra),
        dict(fn_kw, vocab_bias=vb),
        dtype,
        device=triton_device(),
    )


@pytest.mark.parametrize("opts", list(OPTION_SETS))
@pytest.mark.parametrize("N,V,H", [(1, 5, 16), (3, 1000, 576), (257, 1000, 16), (37, 300, 40)])
def test_triton_linear_fp32(opts, N, V, H):
    case_kw, fn_kw = _split(OPTION_SETS[opts])
    h, w, b, target, extra, vb = make_linear_case(
        N, V, H, seed=N + V + H, peak_scale=PEAK, **case_kw
    )
    check_against_reference(
        "linear",
        "triton",
        (h, w, b, target, extra),
        dict(fn_kw, vocab_bias=vb),
        torch.float32,
        device=triton_device(),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_linear_low_precision(dtype):
    case_kw, fn_kw = _split(FULL)
    h, w, b, target, extra, vb = make_linear_case(37, 300, 16, seed=11, peak_scale=PEAK, **case_kw)
    check_against_reference(
        "linear",
        "triton",
        (h, w, b, target, extra),
        dict(fn_kw, vocab_bias=vb),
        dtype,
        device=triton_device(),
    )


def test_triton_linear_no_bias_all_ignored():
    h, w, _, target, extra, _ = make_linear_case(5, 70, 16, seed=13, all_ignored=True)
    our, _, _ = check_against_reference(
        "linear",
        "triton",
        (h, w, None, target, extra),
        dict(return_lse=True),
        torch.float32,
        device=triton_device(),
    )
    assert torch.all(our[0] == 0)


def test_triton_only_some_gradients():
    dev = triton_device()
    h, w, b, target, extra, _ = make_linear_case(9, 70, 16, seed=17)
    hh = h.float().to(dev).requires_grad_()
    ww = w.float().to(dev)
    out = linear_token_logprobs(hh, ww, target.to(dev), None, extra.to(dev), backend="triton")
    (out.logp.sum() + out.extra.sum()).backward()
    ref_h = h.float().requires_grad_()
    ref = linear_token_logprobs(ref_h, w.float(), target, None, extra, backend="reference")
    (ref.logp.sum() + ref.extra.sum()).backward()
    torch.testing.assert_close(hh.grad.cpu(), ref_h.grad, rtol=1e-4, atol=1e-5)


def test_opcheck_triton():
    dev = triton_device()
    logits, target, extra, vb = make_logits_case(5, 33, seed=19, bias=True)
    args = (
        logits.float().to(dev).requires_grad_(),
        target.to(dev),
        extra.to(dev),
        vb.float().to(dev),
        0.8,
        4.0,
        -100,
        True,
        "triton",
    )
    torch.library.opcheck(token_logprobs_op, args)
    _, _, ent, lse = token_logprobs_op(args[0].detach(), *args[1:])
    g = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    torch.library.opcheck(
        token_logprobs_backward_op,
        (
            g(5),
            g(5, 2),
            g(5),
            g(5),
            args[0].detach(),
            *args[1:4],
            lse,
            ent,
            0.8,
            4.0,
            -100,
            "triton",
        ),
    )
    h, w, b, target, extra, vb = make_linear_case(5, 33, 16, seed=23, bias=True)
    largs = (
        h.float().to(dev).requires_grad_(),
        w.float().to(dev).requires_grad_(),
        b.float().to(dev),
        target.to(dev),
        extra.to(dev),
        vb.float().to(dev),
        0.8,
        4.0,
        -100,
        True,
        "triton",
    )
    torch.library.opcheck(linear_token_logprobs_op, largs)
    _, _, ent, lse = linear_token_logprobs_op(largs[0].detach(), largs[1].detach(), *largs[2:])
    torch.library.opcheck(
        linear_token_logprobs_backward_op,
        (
            g(5),
            g(5, 2),
            g(5),
            g(5),
            largs[0].detach(),
            largs[1].detach(),
            *largs[2:6],
            lse,
            ent,
            0.8,
            4.0,
            -100,
            True,
            True,
            True,
            "triton",
        ),
    )


def test_triton_from_logits_matches_torch_on_3d_input():
    dev = triton_device()
    g = torch.Generator().manual_seed(29)
    logits = torch.randn(2, 3, 50, generator=g).to(dev)
    target = torch.randint(0, 50, (2, 3), generator=g).to(dev)
    out = token_logprobs(logits, target, [0, 7], backend="triton", return_entropy=True)
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logp, lsm.gather(-1, target[..., None])[..., 0])
    torch.testing.assert_close(out.extra, lsm[..., [0, 7]])
    torch.testing.assert_close(out.entropy, -(lsm.exp() * lsm).sum(-1))


def test_triton_linear_zero_rows_give_zero_weight_gradients():
    dh, dw, db = zero_row_linear_grads("triton", device=triton_device())
    assert dh.shape == (0, 24)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("linear", [False, True])
def test_triton_out_of_range_ids_without_value_checks(linear):
    check_out_of_range_ids("triton", device=triton_device(), linear=linear)
