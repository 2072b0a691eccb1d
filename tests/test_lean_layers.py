"""The lean layers of the teacher-forced pass (fastgfn/trainer/model/lean_layers.py and
lean_modules.py): values and gradients against float64 references, within 2x the error of the
modules they replace at that precision (fp32, autocast bf16, bf16 weights), on irregular
shapes, peaked rows and no rows; what they keep for the backward; which modules of which
models they replace, and that everything is put back."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastgfn.trainer.model import lean_modules
from fastgfn.trainer.model.lean_layers import linear, rms_norm, swiglu_mlp
from fastgfn.trainer.scoring import hidden_states

transformers = pytest.importorskip("transformers")

MODES = ("fp32", "autocast", "bf16")  # fp32 / fp32 weights under autocast bf16 / bf16 weights
SHAPES = [(3, 5, 17), (1, 1, 8), (0, 12), (7, 33)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _context(mode):
    if mode == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cast(mode, *tensors):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    return [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]


def _run(fn, mode, inputs, upstream):
    """fn's output and the gradients of <output, upstream> w.r.t. every input."""
    leaves = _cast(mode, *inputs)
    with _context(mode):
        out = fn(*leaves)
    (out.double() * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _reference(fn, inputs, upstream):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _assert_within_twice(ours, eager, ref, floor):
    for name, a, b, r in zip(["output", *(f"grad {i}" for i in range(len(ours) - 1))],
                             ours, eager, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err, eager_err = _rel(a, r), _rel(b, r)
        assert err <= 2 * eager_err + floor, (name, err, eager_err)


def _eager_rms_norm(x, w, eps):  # transformers' LlamaRMSNorm
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _eager_swiglu(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _inputs(shape, *, peaked: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if peaked and x.numel():
        x.view(-1, shape[-1])[:, 0] *= 50.0  # one dominant feature a row
    return x, gen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("peaked", [False, True])
def test_rms_norm_against_float64(mode, shape, peaked):
    x, gen = _inputs(shape, peaked=peaked, seed=1)
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=gen)
    up = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = 1e-5
    ours = _run(lambda a, b: rms_norm(a, b, eps), mode, [x, w], up)
    eager = _run(lambda a, b: _eager_rms_norm(a, b, eps), mode, [x, w], up)
    ref = _reference(lambda a, b: _eager_rms_norm(a, b, eps), [x, w], up)
    _assert_within_twice(ours, eager, ref, floor=2e-7)


def test_rms_norm_output_dtype_is_the_rounding_of_the_fp32_output():
    x, gen = _inputs((4, 6, 16), peaked=False, seed=2)
    w = 1.0 + 0.3 * torch.randn(16, generator=gen)
    y = rms_norm(x, w, 1e-6, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _eager_rms_norm(x, w, 1e-6).to(torch.bfloat16), rtol=0, atol=0)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    up = torch.randn(x.shape, generator=gen)
    (rms_norm(xg, wg, 1e-6, torch.bfloat16).float() * up).sum().backward()
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (_eager_rms_norm(xe, we, 1e-6).to(torch.bfloat16).float() * up).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wg.grad, we.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("peaked", [False, True])
def test_swiglu_mlp_against_float64(mode, shape, peaked):
    x, gen = _inputs(shape, peaked=peaked, seed=3)
    hidden, inter = shape[-1], 2 * shape[-1] + 3
    wg = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    wu = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    wd = torch.randn(hidden, inter, generator=gen) / inter**0.5
    up = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = _run(swiglu_mlp, mode, [x, wg, wu, wd], up)
    eager = _run(_eager_swiglu, mode, [x, wg, wu, wd], up)
    ref = _reference(_eager_swiglu, [x, wg, wu, wd], up)
    _assert_within_twice(ours, eager, ref, floor=2e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_against_float64(mode, bias):
    x, gen = _inputs((3, 5, 24), peaked=True, seed=4)
    w = torch.randn(10, 24, generator=gen) / 5
    b = torch.randn(10, generator=gen)
    up = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)
    inputs = [x, w, b] if bias else [x, w]
    ours = _run(linear, mode, inputs, up)
    eager = _run(F.linear, mode, inputs, up)
    ref = _reference(F.linear, inputs, up)
    _assert_within_twice(ours, eager, ref, floor=1e-7)
    assert torch.equal(ours[0], eager[0])  # the same product, operands rounded alike


def _saved(fn, *args):
    """(dtype, shape) of every distinct tensor ``fn`` keeps for the backward."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.dtype, tuple(t.shape)))
        return t

    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16)):
        fn(*args)
    return list(seen.values())


def test_under_autocast_no_rounded_weight_copy_is_kept():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    wg, wu = (torch.randn(40, 16, generator=gen, requires_grad=True) for _ in range(2))
    wd = torch.randn(16, 40, generator=gen, requires_grad=True)
    weight_shapes = {(40, 16), (16, 40)}
    eager = _saved(_eager_swiglu, x, wg, wu, wd)
    ours = _saved(swiglu_mlp, x, wg, wu, wd)
    assert {s for d, s in eager if d == torch.bfloat16} >= weight_shapes  # autocast's copies
    assert not {s for d, s in ours if d == torch.bfloat16} & weight_shapes
    assert sum(s == (6, 40) for _, s in eager) == 4  # gate, silu(gate), up, their product
    assert sum(s == (6, 40) for _, s in ours) == 2  # gate and up only
    ours = _saved(linear, x, wd.t().detach().contiguous().requires_grad_(True))
    assert (torch.bfloat16, (40, 16)) not in ours and (torch.bfloat16, (6, 16)) in ours


def _tiny(model_type: str, dtype=torch.float32):
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, attn_implementation="sdpa")
    config = {
        "llama": lambda: transformers.LlamaConfig(tie_word_embeddings=True, **common),
        "qwen2": lambda: transformers.Qwen2Config(tie_word_embeddings=False, **common),
        "mistral": lambda: transformers.MistralConfig(sliding_window=None, **common),
        "llama-mlp-bias": lambda: transformers.LlamaConfig(mlp_bias=True, **common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
    }[model_type]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model.to(dtype).train()


def _teacher_forced(model, mode, lean: bool, monkeypatch):
    """Hidden states and every weight's gradient of one teacher-forced pass."""
    monkeypatch.setenv("FASTGFN_LEAN_LAYERS", "1" if lean else "0")
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 61, (5,), generator=gen)
    tokens = torch.randint(0, 61, (3, 4), generator=gen)
    model.zero_grad(set_to_none=True)
    with _context(mode):
        h = hidden_states(model, prompt, tokens)
    up = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    (h.double() * up).sum().backward()
    return [h.detach()] + [p.grad.clone() for p in model.get_decoder().parameters()]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", MODES)
def test_teacher_forced_pass_against_float64(model_type, mode, monkeypatch):
    model = _tiny(model_type, torch.bfloat16 if mode == "bf16" else torch.float32)
    assert lean_modules.lean_forwards(model)  # every norm, MLP and projection of the layers
    ref = _teacher_forced(_tiny(model_type, torch.float64), "fp32", False, monkeypatch)
    eager = _teacher_forced(model, mode, False, monkeypatch)
    ours = _teacher_forced(model, mode, True, monkeypatch)
    _assert_within_twice(ours, eager, ref, floor=1e-6)


def test_teacher_forced_pass_float64_is_transformers_to_its_fp32_statistics(monkeypatch):
    # transformers computes the norms' statistics in fp32 even for float64 weights; the
    # lean norm keeps float64 there, so the two agree to fp32 rounding
    model = _tiny("qwen2", torch.float64)
    eager = _teacher_forced(model, "fp32", False, monkeypatch)
    ours = _teacher_forced(model, "fp32", True, monkeypatch)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _swapped(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


def test_forwards_swapped_inside_only_and_put_back(monkeypatch):
    monkeypatch.setenv("FASTGFN_LEAN_LAYERS", "1")
    model = _tiny("llama")
    per_layer = 2 + 1 + 4  # two norms, the MLP, four projections
    with lean_modules.lean_teacher_forced_layers(model):
        assert len(_swapped(model)) == per_layer * model.config.num_hidden_layers
    assert not _swapped(model)
    with pytest.raises(RuntimeError, match="inside"), \
            lean_modules.lean_teacher_forced_layers(model):
        raise RuntimeError("inside")
    assert not _swapped(model)
    with torch.no_grad(), lean_modules.lean_teacher_forced_layers(model):
        assert not _swapped(model)
    monkeypatch.setenv("FASTGFN_LEAN_LAYERS", "0")
    with lean_modules.lean_teacher_forced_layers(model):
        assert not _swapped(model)


def test_only_transformers_own_modules_are_swapped(monkeypatch):
    monkeypatch.setenv("FASTGFN_LEAN_LAYERS", "1")
    assert not lean_modules.lean_forwards(_tiny("gemma"))  # another norm: (1 + w) * n
    checkpointed = _tiny("llama")
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()
    assert not lean_modules.lean_forwards(checkpointed)  # recomputes outside the context
    biased = lean_modules.lean_forwards(_tiny("llama-mlp-bias"))
    assert not any(type(m).__name__ == "LlamaMLP" for m, _ in biased)

    class Adapter(torch.nn.Linear):  # e.g. a LoRA layer: not the plain linear
        pass

    model = _tiny("llama")
    layer = model.model.layers[0]
    old = layer.self_attn.q_proj
    layer.self_attn.q_proj = Adapter(old.in_features, old.out_features, bias=False)
    hooked = layer.mlp
    marker = hooked.forward
    hooked.forward = lambda x: marker(x)  # a forward already replaced on the instance
    swapped = {id(m) for m, _ in lean_modules.lean_forwards(model)}
    assert id(layer.self_attn.q_proj) not in swapped and id(hooked) not in swapped
    assert id(layer.self_attn.k_proj) in swapped and id(model.model.layers[1].mlp) in swapped
    with lean_modules.lean_teacher_forced_layers(model):
        pass
    assert hooked.__dict__["forward"] is not marker and "forward" in hooked.__dict__


def test_saved_tensors_bench_counts_less_with_the_lean_layers(monkeypatch):
    """bench/saved_tensors.py's accounting on a tiny Llama: the lean layers keep less, and
    the hooks it installs are gone afterwards."""
    from bench.saved_tensors import saved_by_module

    model = _tiny("llama")
    gen = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 61, (5,), generator=gen)
    tokens = torch.randint(0, 61, (4, 6), generator=gen)
    totals = {}
    for lean in ("1", "0"):
        monkeypatch.setenv("FASTGFN_LEAN_LAYERS", lean)
        for precision in ("no", "bf16"):
            groups = saved_by_module(model, prompt, tokens, 3, precision)
            totals[lean, precision] = sum(v[0] for v in groups.values())
    for precision in ("no", "bf16"):
        assert 0 < totals["1", precision] < totals["0", precision], totals
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
