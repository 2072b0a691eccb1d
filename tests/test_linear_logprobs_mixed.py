"""The fused lm_head op in bf16: its bf16 -> fp32 product paths (kernels/cpu/bf16_gemm.h,
bf16_dot_gemm.h) and mixed precision's fp32 master weights with bf16 hidden states.

The C++ backend takes a bf16 product where the CPU has one (MKL on AMX, the vdpbf16ps kernel
on AVX512-BF16 without AMX; elsewhere it rounds nothing and computes in fp32).
``FASTGFN_CPU_BF16_GEMM`` picks the path: ``mkl`` runs MKL's product on any CPU (it emulates
it correctly without bf16 instructions), ``avx512_bf16`` the dot-product kernel (where the CPU
has the instruction: these cases say so when they skip), ``0`` the fp32 products, so each is
checked wherever it can run. Every case: values and gradients against float64 with the
2x-PyTorch rule at bf16 (tests/logprobs_cases.py), irregular shapes, several row blocks, -inf
vocabulary masks, peaked rows, no rows.
"""

from __future__ import annotations

import pytest
import torch

from fastgfn.lm_logprobs import gfn_logprobs_from_hidden
from fastgfn.ops.logprobs import linear_token_logprobs

from .logprobs_cases import check_against_reference, make_linear_case, zero_row_linear_grads

BF16 = torch.bfloat16
PRODUCTS = ["mkl", "avx512_bf16", "0"]


def _use_products(monkeypatch, mode: str) -> None:
    monkeypatch.setenv("FASTGFN_CPU_BF16_GEMM", mode)
    try:
        torch.ops.fastgfn_cpu.bf16_gemm_backend()
    except RuntimeError as err:
        assert mode == "avx512_bf16" and "no AVX512-BF16" in str(err)
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps)")


@pytest.fixture(params=PRODUCTS, ids=["mkl-products", "dot-products", "fp32-products"])
def products(request, monkeypatch):
    _use_products(monkeypatch, request.param)
    return request.param


def test_backend_names_the_products(monkeypatch):
    """The switch resolves as documented: 0 is off, mkl is MKL, 1 and unset the CPU's own
    (never off where the CPU has bf16 instructions), and a bad value is refused by name."""
    for mode, want in (("0", "off"), ("mkl", "mkl")):
        monkeypatch.setenv("FASTGFN_CPU_BF16_GEMM", mode)
        assert torch.ops.fastgfn_cpu.bf16_gemm_backend() == want
    monkeypatch.setenv("FASTGFN_CPU_BF16_GEMM", "1")
    assert torch.ops.fastgfn_cpu.bf16_gemm_backend() in ("mkl", "avx512_bf16")
    monkeypatch.delenv("FASTGFN_CPU_BF16_GEMM")
    own = torch.ops.fastgfn_cpu.bf16_gemm_backend()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "amx_bf16" in flags:
        assert own == "mkl"
    elif "avx512_bf16" in flags:
        assert own == "avx512_bf16"
    else:
        assert own == "off"
    monkeypatch.setenv("FASTGFN_CPU_BF16_GEMM", "yes")
    with pytest.raises(RuntimeError, match="FASTGFN_CPU_BF16_GEMM"):
        torch.ops.fastgfn_cpu.bf16_gemm_backend()


CASES = {  # N, V, H, options
    "irregular": (37, 1000, 24, dict(temperature=0.8, return_entropy=True, return_lse=True)),
    "softcap": (300, 700, 16, dict(softcap=10.0, return_entropy=True, return_lse=True)),
    "tiles": (513, 1537, 64, dict(temperature=1.3, return_lse=True)),
    "one_row": (1, 5, 16, dict(return_entropy=True)),
    "odd_hidden": (29, 300, 23, dict(temperature=0.9, return_lse=True)),  # odd K, unaligned rows
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weight_dtype", [BF16, torch.float32], ids=["bf16-weight", "fp32-weight"])
def test_cpp_bf16_against_float64(products, case, weight_dtype):
    N, V, H, opts = CASES[case]
    h, w, b, target, extra, vb = make_linear_case(N, V, H, seed=N + V, bias=True)
    check_against_reference(
        "linear", "cpp", (h, w, b, target, extra), dict(opts, vocab_bias=vb), BF16,
        seed=N, weight_dtype=None if weight_dtype == BF16 else weight_dtype,
    )


def test_cpp_bf16_row_blocks(products, monkeypatch):
    """Three backward row blocks: dW accumulates across them in fp32."""
    monkeypatch.setenv("FASTGFN_LOGPROBS_ROW_BLOCK", "256")
    h, w, b, target, extra, vb = make_linear_case(600, 700, 24, seed=71, bias=True)
    check_against_reference(
        "linear", "cpp", (h, w, b, target, extra),
        dict(vocab_bias=vb, softcap=10.0, return_entropy=True, return_lse=True), BF16, seed=8,
        weight_dtype=torch.float32,
    )


def test_cpp_bf16_no_bias_no_rows(products):
    h, w, _, target, extra, vb = make_linear_case(45, 600, 16, seed=73, with_bias=False)
    check_against_reference("linear", "cpp", (h, w, None, target, extra),
                            dict(vocab_bias=vb, return_lse=True), BF16, seed=2)
    dh, dw, db = zero_row_linear_grads("cpp", dtype=BF16)
    assert dh.shape == (0, 24)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_bf16_products_differ_from_fp32_products(monkeypatch):
    """The switch does switch: the bf16 products round the fp32 weights, the fp32 ones do
    not, so the results differ (they would not if the library lacked MKL's bf16 product and
    fell back), and both stay within bf16's error; the two bf16 products agree to fp32
    accumulation order."""
    h, w, b, target, extra, _ = make_linear_case(64, 900, 32, seed=3, peaked=False)
    out = {}
    for mode in PRODUCTS:
        monkeypatch.setenv("FASTGFN_CPU_BF16_GEMM", mode)
        try:
            torch.ops.fastgfn_cpu.bf16_gemm_backend()
        except RuntimeError:
            continue  # no AVX512-BF16 here
        out[mode] = linear_token_logprobs(h.to(BF16), w.float(), target, b.float(), extra,
                                          backend="cpp").logp
    assert not torch.equal(out["mkl"], out["0"])
    torch.testing.assert_close(out["mkl"], out["0"], rtol=0, atol=0.05)
    if "avx512_bf16" in out:
        torch.testing.assert_close(out["avx512_bf16"], out["mkl"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_master_weights_dtype_rules(backend):
    h, w, b, target, extra, _ = make_linear_case(5, 40, 8, seed=5)
    hb, wf, bf = h.to(BF16), w.float(), b.float()
    out = linear_token_logprobs(hb, wf, target, bf, extra, backend=backend)
    assert out.logp.dtype == torch.float32
    with pytest.raises(TypeError, match="weight"):  # a weight below hidden's precision
        linear_token_logprobs(h.float(), w.to(BF16), target, backend=backend)
    with pytest.raises(TypeError, match="weight"):  # fp64 weights are not master weights
        linear_token_logprobs(hb, w, target, backend=backend)
    with pytest.raises(TypeError, match="bias"):  # the bias follows the weight
        linear_token_logprobs(hb, wf, target, b.to(BF16), backend=backend)


def test_lm_head_under_autocast_runs_the_head_in_bf16(monkeypatch):
    """``lm_head_logprobs`` under autocast hands the op bf16 hidden states and the fp32
    weight (as ``F.linear`` would take bf16 operands), the weight's gradient comes back fp32,
    and the result is the unfused autocast path's within bf16's error."""
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model.loading import load_model

    torch.manual_seed(0)
    model, _ = load_model(load_config(None, ["model=tiny", "tiny_hidden=64"]))
    seen = []
    import fastgfn.ops.logprobs as ops

    real = ops.linear_token_logprobs_op

    def spy(hidden, weight, *rest):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *rest)

    monkeypatch.setattr(ops, "linear_token_logprobs_op", spy)
    B, T, H = 4, 5, model.config.hidden_size
    tokens = torch.randint(3, model.config.vocab_size, (B, T))
    hidden = torch.randn(B, T + 1, H)
    res = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            log_pf, log_pterm = gfn_logprobs_from_hidden(model, hidden, tokens, 2, fused=fused)
        (log_pf.sum() + log_pterm.sum()).backward()
        grad = model.get_output_embeddings().weight.grad
        assert grad.dtype == torch.float32
        res[fused] = (log_pf.detach(), log_pterm.detach(), grad.clone())
    assert seen == [(BF16, torch.float32)]
    for a, b in zip(res[True], res[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
