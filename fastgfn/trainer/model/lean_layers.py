"""Decoder layers that keep less for the backward: RMSNorm, the SwiGLU MLP and the linear.

The same maths as transformers' modules (Llama, Mistral, Qwen2), as autograd functions that
save fewer tensors. Each recomputes what is cheap instead of keeping it:

RMSNorm, ``y = w * n`` with ``n = x * r`` and ``r = 1 / sqrt(mean(x^2) + eps)`` (statistics
in fp32, float64 for float64 inputs; ``n`` rounded to x's dtype as transformers does), keeps
``x`` and ``r`` (one value a row) instead of x and n. Backward, with ``g = dy * w``:

    dw = sum_rows(dy * n)        dx = r * (g - n * mean(g * n))

SwiGLU MLP, ``out = (silu(x Wg^T) * (x Wu^T)) Wd^T``, keeps the two projections
``a = x Wg^T`` and ``b = x Wu^T`` and recomputes ``s = silu(a)`` and the product ``p = s * b``
in the backward, instead of keeping a, s, b and p (two of the four ``rows x intermediate``
tensors):

    dWd = dout^T p      dp = dout Wd      db = dp * s      da = dp * b * silu'(a)
    dWg = da^T x        dWu = db^T x      dx = da Wg + db Wu

with ``silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))``.

Under ``torch.autocast`` the products run in its dtype as they do in transformers (operands
rounded to it, the result in it), and the linear and the MLP keep the fp32 weights themselves
(parameters, no memory) and round them again in the backward, instead of the rounded copies
autocast would keep alive for it: on SmolLM2-135M, 202 MB of bf16 weights. The normalisation's
output can be returned in the autocast dtype directly (``out_dtype``): the linear layers it
feeds round it to that dtype anyway, and then share one copy instead of keeping one each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgfn.lm_logprobs import autocast_matmul_dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy^T x`` over all rows, in the product's dtype, returned in the weight's dtype."""
    return (_rows(dy).t() @ _rows(x)).to(weight.dtype)


def _statistics_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(_statistics_dtype(x))
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            y = weight * (xf * r).to(x.dtype)
        ctx.save_for_backward(x, r, weight)
        ctx.y_dtype = y.dtype
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, r, weight = ctx.saved_tensors
        dy = dy.to(ctx.y_dtype)
        nf = x.to(r.dtype) * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _rows(dy * nf.to(x.dtype)).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).to(r.dtype)
            dx = (r * (g - nf * (g * nf).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """transformers' RMSNorm, ``weight * (x / sqrt(mean(x^2) + eps))``, keeping x and one
    value a row for the backward; ``out_dtype``: the result rounded to it."""
    return _RMSNorm.apply(x, weight, float(eps), out_dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            y = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, weight, bias)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, weight, bias = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dy, xc, weight)
        if bias is not None and ctx.needs_input_grad[2]:
            db = _rows(dy).sum(0).to(bias.dtype)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear`` that, under autocast, keeps the fp32 weight for the backward (and rounds
    it again there) instead of autocast's rounded copy; plain ``F.linear`` otherwise."""
    dtype = autocast_matmul_dtype(x, weight)
    if dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            a = F.linear(xc, w_gate.to(dtype))
            b = F.linear(xc, w_up.to(dtype))
            out = F.linear(F.silu(a) * b, w_down.to(dtype))
        ctx.save_for_backward(xc, a, b, w_gate, w_up, w_down)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        xc, a, b, w_gate, w_up, w_down = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        dout = dout.to(dtype)
        s = F.silu(a)
        dw_down = _weight_grad(dout, s * b, w_down) if need[3] else None
        dp = dout @ w_down.to(dtype)
        db = dp * s
        da = torch.ops.aten.silu_backward(dp * b, a)
        del dp, s
        dw_gate = _weight_grad(da, xc, w_gate) if need[1] else None
        dw_up = _weight_grad(db, xc, w_up) if need[2] else None
        dx = None
        if need[0]:
            dx = (da @ w_gate.to(dtype)).to(ctx.x_dtype) + (db @ w_up.to(dtype)).to(ctx.x_dtype)
        return dx, dw_gate, dw_up, dw_down, None


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """``(silu(x Wg^T) * (x Wu^T)) Wd^T`` (no biases), keeping x and the two projections for
    the backward (see the module's text)."""
    return _SwiGLU.apply(x, w_gate, w_up, w_down, autocast_matmul_dtype(x, w_gate))
