"""The lean bf16 decoder against transformers: logits within 2x transformers' own bf16 error
(float64 reference), prompt and decode steps, dropped rows, several Llama-family types."""

import copy

import pytest
import torch

from fastgfn.trainer.model.kv_cache import cache_kwarg, output_cache
from fastgfn.trainer.sampling.lean_decoder import LeanDecoder, lean_decoder_unsupported
from fastgfn.trainer.sampling.packed_linear import packing_supported
from fastgfn.trainer.sampling.replica import SamplingReplica
from fastgfn.trainer.sampling.sampler import sample

needs_bf16 = pytest.mark.skipif(
    not packing_supported(torch.bfloat16),
    reason="this CPU or PyTorch build has no oneDNN bf16 (the lean decoder is then never used)",
)
VOCAB = 96


def _tiny(model_type: str, seed: int = 0):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    if model_type == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=True, **common)
    elif model_type == "llama-mha-scaled-rope":  # no GQA, linear RoPE scaling, attention bias
        config = transformers.LlamaConfig(tie_word_embeddings=False, attention_bias=True,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0},
                                          **{**common, "num_key_value_heads": 4})
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
    elif model_type == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
    else:
        raise ValueError(model_type)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # non-trivial biases and norm gains
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else
                        0.5 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:  # peaked attention: positions matter
                p.mul_(12.0)
    return model


def _hf_step_logits(model, prompt, steps, keep_after):
    """Prompt logits and per-step logits from transformers, same schedule as the test."""
    kw = cache_kwarg(model)
    B = steps.shape[0]
    with torch.no_grad():
        out = model(input_ids=prompt[None].expand(B, -1), use_cache=True)
        cache, logits = output_cache(out), [out.logits[:1, -1]]
        rows = torch.arange(B)
        for t in range(steps.shape[1]):
            if t == keep_after:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[[0, 2]], layer.values[[0, 2]]
                rows = rows[[0, 2]]
            out = model(input_ids=steps[rows, t:t + 1], use_cache=True, **{kw: cache})
            cache = output_cache(out)
            logits.append(out.logits[:, -1])
    return [x.double() for x in logits]


def _lean_step_logits(decoder, prompt, steps, keep_after):
    B = steps.shape[0]
    with torch.no_grad():
        decoding = decoder.start(prompt, B, steps.shape[1])
        logits, rows = [decoding.first_logits[:1]], torch.arange(B)
        for t in range(steps.shape[1]):
            if t == keep_after:
                decoding.keep_rows(torch.tensor([0, 2]))
                rows = rows[[0, 2]]
            logits.append(decoding.step(steps[rows, t]))
    return [x.double() for x in logits]


@needs_bf16
@pytest.mark.parametrize("model_type", ["llama", "llama-mha-scaled-rope", "qwen2", "mistral"])
def test_lean_decoder_within_twice_transformers_bf16_error(model_type):
    model = _tiny(model_type)
    assert lean_decoder_unsupported(model) is None
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (7,), generator=g)
    steps = torch.randint(0, VOCAB, (3, 5), generator=g)
    keep_after = 2  # row 1 stops after two steps
    exact = _hf_step_logits(copy.deepcopy(model).double(), prompt, steps, keep_after)
    hf_bf16 = _hf_step_logits(copy.deepcopy(model).to(torch.bfloat16), prompt, steps, keep_after)
    lean = _lean_step_logits(LeanDecoder(model, torch.bfloat16, batch_hint=3), prompt, steps,
                             keep_after)
    assert len(lean) == len(exact)
    for want, theirs, ours in zip(exact, hf_bf16, lean):
        assert ours.shape == want.shape
        their_err = (theirs - want).abs().max().item()
        our_err = (ours - want).abs().max().item()
        assert our_err <= 2 * their_err + 1e-6, (our_err, their_err)


@needs_bf16
def test_lean_decoder_reloads_new_weights():
    model = _tiny("llama")
    decoder = LeanDecoder(model, torch.bfloat16)
    prompt = torch.tensor([3, 4, 5])
    before = decoder.start(prompt, 1, 1).first_logits.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    after = decoder.load(model).start(prompt, 1, 1).first_logits
    fresh = LeanDecoder(model, torch.bfloat16).start(prompt, 1, 1).first_logits
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


@needs_bf16
def test_lean_replica_samples_the_policy_distribution():
    """First-token frequencies of the lean replica match the fp32 policy's probabilities."""
    model = _tiny("llama")
    replica = SamplingReplica(model, torch.bfloat16, batch_hint=64)
    assert replica.lean
    prompt = torch.tensor([5, 6, 7, 8])
    g = torch.Generator().manual_seed(0)
    firsts = []
    for _ in range(50):
        r = sample(replica.sync(model), prompt, 80, max_new_tokens=2, min_new_tokens=1,
                   termination_token_id=1, temperatures=2.0, generator=g)
        assert (r.lengths >= 1).all() and (r.lengths <= 2).all()
        firsts.append(r.tokens[:, 0])
    freq = torch.bincount(torch.cat(firsts), minlength=VOCAB).double() / 4000
    with torch.no_grad():
        z = model(input_ids=prompt[None]).logits[0, -1].double() / 2.0
    z[1] = float("-inf")  # min length 1: no termination at the first step
    assert (freq - torch.softmax(z, -1)).abs().max() < 0.03


def _tiny_gemma():
    import transformers

    return transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def test_lean_decoder_refuses_what_it_does_not_implement():
    gemma = _tiny_gemma()
    assert "model type" in lean_decoder_unsupported(gemma)
    with pytest.raises(ValueError, match="unsupported model"):
        LeanDecoder(gemma, torch.bfloat16)
    with pytest.raises(ValueError, match="lean"):
        SamplingReplica(gemma, torch.bfloat16, lean=True)
    llama = _tiny("llama")
    assert "sliding" in lean_decoder_unsupported(_tiny_mistral_sliding())
    if packing_supported(torch.bfloat16):
        with pytest.raises(ValueError, match="batch_hint"):
            LeanDecoder(llama, torch.bfloat16, batch_hint=0)
    with pytest.raises(ValueError, match="dtype"):
        LeanDecoder(llama, torch.float32)


def test_lean_decoder_refuses_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"]))
    assert "LoRA" in lean_decoder_unsupported(model)


def _tiny_mistral_sliding():
    import transformers

    return transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=16))


def test_replica_packs_only_rollouts_long_enough_to_repay_it():
    """The lean decoder is always chosen where it applies; prepacked transformers layers only
    for rollouts of at least PACK_MIN_NEW_TOKENS tokens (unless asked for)."""
    from fastgfn.trainer.sampling.replica import PACK_MIN_NEW_TOKENS

    llama, gemma = _tiny("llama"), _tiny_gemma()
    short = PACK_MIN_NEW_TOKENS - 1
    assert SamplingReplica(llama, torch.bfloat16, max_new_tokens=2).lean \
        is packing_supported(torch.bfloat16)
    assert not SamplingReplica(gemma, torch.bfloat16, max_new_tokens=short).packed
    long = SamplingReplica(gemma, torch.bfloat16, max_new_tokens=PACK_MIN_NEW_TOKENS)
    assert long.packed is packing_supported(torch.bfloat16) and not long.lean
    if packing_supported(torch.bfloat16):  # asked for explicitly: packed whatever the length
        assert SamplingReplica(gemma, torch.bfloat16, pack=True, max_new_tokens=2).packed
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingReplica(llama, torch.bfloat16, max_new_tokens=0)
