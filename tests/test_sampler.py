import contextlib
import copy

import pytest
import torch

from fastgfn.trainer import load_config
from fastgfn.trainer.model.kv_cache import cache_kwarg, output_cache
from fastgfn.trainer.model.loading import build_tiny
from fastgfn.trainer.sampling.attention import packed_decode_attention
from fastgfn.trainer.sampling.packed_linear import pack_linear_layers, packing_supported
from fastgfn.trainer.sampling.replica import SamplingReplica
from fastgfn.trainer.sampling.sampler import draw_temperatures, sample, sample_categorical
from fastgfn.trainer.scoring import gfn_logprobs


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, ["model=tiny", "tiny_hidden=32"])
    model, tok = build_tiny(cfg, seed=3)
    return model.eval(), tok


def _full_logprobs(model, prompt, tokens):
    ids = torch.cat([prompt[None].expand(tokens.shape[0], -1), tokens], 1)
    logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, prompt.numel() - 1 :], -1)  # states s_0..s_T


def test_scoring_matches_full_forward(tiny):
    model, tok = tiny
    prompt = torch.tensor(tok.encode("number: "))
    tokens = torch.randint(2, len(tok), (5, 4))
    term = tok.encode(",")[0]
    log_pf, log_pterm = gfn_logprobs(model, prompt, tokens, term, use_fused=False)
    ref = _full_logprobs(model, prompt, tokens)
    assert log_pf.shape == (5, 4) and log_pterm.shape == (5, 5)
    torch.testing.assert_close(
        log_pf, ref[:, :4].gather(2, tokens[..., None]).squeeze(2), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(log_pterm, ref[:, :, term], atol=1e-5, rtol=1e-5)


def test_scoring_gradient_through_shared_prompt(tiny):
    model, tok = tiny
    prompt = torch.tensor(tok.encode("abc "))
    tokens = torch.randint(2, len(tok), (3, 2))
    model.zero_grad()
    log_pf, log_pterm = gfn_logprobs(model, prompt, tokens, 5, use_fused=False)
    (log_pf.sum() + log_pterm.sum()).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = _full_logprobs(model, prompt, tokens)
    (ref[:, :2].gather(2, tokens[..., None]).sum() + ref[:, :, 5].sum()).backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_sample_stops_pads_and_respects_bias(tiny):
    model, tok = tiny
    prompt = torch.tensor(tok.encode("x"))
    term = tok.encode(",")[0]
    bias = torch.full((len(tok),), float("-inf"))
    allowed = tok.encode("0123,")
    bias[allowed] = 0.0
    g = torch.Generator().manual_seed(0)
    r = sample(
        model,
        prompt,
        64,
        max_new_tokens=5,
        min_new_tokens=1,
        termination_token_id=term,
        vocab_bias=bias,
        generator=g,
        pad_token_id=0,
    )
    assert r.tokens.shape[0] == 64 and r.tokens.shape[1] <= 5
    assert (r.lengths >= 1).all()  # termination forbidden before min_new_tokens
    for row, n, done in zip(r.tokens.tolist(), r.lengths.tolist(), r.terminated.tolist()):
        assert all(t in allowed[:-1] for t in row[:n])
        assert all(t == 0 for t in row[n:])
        assert done or n == 5
    assert r.terminated.any() and not r.terminated.all()


def test_sample_matches_policy_distribution(tiny):
    """One-step sampling frequencies follow the model's (tempered) next-token distribution."""
    model, tok = tiny
    prompt = torch.tensor(tok.encode("hi"))
    g = torch.Generator().manual_seed(1)
    r = sample(
        model, prompt, 4000, max_new_tokens=1, termination_token_id=1, generator=g, temperatures=2.0
    )
    with torch.no_grad():
        p = torch.softmax(model(input_ids=prompt[None]).logits[0, -1] / 2.0, -1)
    first = torch.where(r.terminated, torch.ones_like(r.lengths), r.tokens[:, 0])
    freq = torch.bincount(first, minlength=len(tok)).float() / 4000
    assert (freq - p).abs().max() < 0.03


def test_sample_categorical_is_exact_and_skips_zero_mass():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    draws = torch.stack([sample_categorical(probs * 7.0, g) for _ in range(20000)], 1)  # unnormed
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=6).float() / 20000
        assert (freq[probs[row] == 0] == 0).all()
        assert (freq - probs[row]).abs().max() < 0.015


@pytest.mark.parametrize("pack", [False, True])
def test_sampling_replica_tracks_the_policy(tiny, pack):
    model, tok = tiny
    if pack and not packing_supported(torch.bfloat16):
        pytest.skip("this CPU or PyTorch build has no oneDNN bf16 (packing is then never used)")
    model = copy.deepcopy(model)
    replica = SamplingReplica(model, torch.bfloat16, pack=pack, batch_hint=4, lean=False)
    plain = SamplingReplica(model, torch.bfloat16, pack=False)
    assert replica.packed is pack
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    sampler_model = replica.sync(model).model
    reference = plain.sync(model).model
    for a, b in zip(reference.parameters(), model.parameters()):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.to(torch.bfloat16).float())
    ids = torch.tensor([tok.encode("n: 12"), tok.encode("n: 99")])
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        got = torch.log_softmax(sampler_model(input_ids=ids).logits.float(), -1)
        same_bf16 = torch.log_softmax(reference(input_ids=ids).logits.float(), -1)
    assert (got - want).abs().max() < 0.1  # bf16 rounding, not a different model
    torch.testing.assert_close(got, same_bf16, rtol=0, atol=1e-6)  # packing changes nothing


def test_packed_replica_samples_what_the_plain_replica_samples(tiny):
    if not packing_supported(torch.bfloat16):
        pytest.skip("this CPU or PyTorch build has no oneDNN bf16 (packing is then never used)")
    model, tok = tiny
    prompt = torch.tensor(tok.encode("n: "))
    rollouts = []
    for pack in (False, True):
        replica = SamplingReplica(model, torch.bfloat16, pack=pack, batch_hint=8, lean=False)
        rollouts.append(sample(replica.sync(model), prompt, 8, max_new_tokens=6,
                               termination_token_id=1, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(rollouts[0].tokens, rollouts[1].tokens)
    assert torch.equal(rollouts[0].lengths, rollouts[1].lengths)


def test_packing_frees_dense_weights_but_keeps_tied_ones(tiny):
    if not packing_supported(torch.bfloat16):
        pytest.skip("this CPU or PyTorch build has no oneDNN bf16 (packing is then never used)")
    model, _ = tiny
    replica = SamplingReplica(model, torch.bfloat16, pack=True, lean=False).model
    q_proj = replica.model.layers[0].self_attn.q_proj
    assert q_proj.weight.numel() == 0  # only the packed copy remains
    assert replica.lm_head.weight is replica.model.embed_tokens.weight  # tied: kept
    assert replica.lm_head.weight.numel() > 0


def test_packing_refuses_what_it_cannot_pack(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="pack"):
        SamplingReplica(model, torch.float32, pack=True)
    with pytest.raises(ValueError, match="batch_hint"):
        pack_linear_layers(copy.deepcopy(model).to(torch.bfloat16), 0)


def test_packed_gqa_decode_attention_matches_sdpa(tiny):
    """The decode-time GQA packing gives transformers' SDPA result, and only while active."""
    model, tok = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    assert model.config.num_attention_heads != model.config.num_key_value_heads
    prompt = torch.tensor([tok.encode("n: 4")]).expand(3, -1)
    step = torch.tensor([[5], [6], [7]])
    kw = cache_kwarg(model)
    with torch.no_grad():
        outs = []
        for packed in (False, True):
            out = model(input_ids=prompt, use_cache=True)
            ctx = packed_decode_attention(model) if packed else contextlib.nullcontext()
            with ctx:
                if packed:
                    assert model.config._attn_implementation != "sdpa"
                outs.append(model(input_ids=step, use_cache=True,
                                  **{kw: output_cache(out)}).logits.float())
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(outs[1], outs[0], rtol=0.02, atol=0.02)
    fp32 = copy.deepcopy(model).float()
    with packed_decode_attention(fp32):  # fp32: the flash kernel's own GQA is kept
        assert fp32.config._attn_implementation == "sdpa"


def test_temperatures():
    g = torch.Generator().manual_seed(0)
    t = draw_temperatures(1000, prob=0.3, low=1.5, high=2.5, generator=g)
    tempered = t != 1.0
    assert 0.2 < tempered.float().mean() < 0.4
    assert ((t[tempered] >= 1.5) & (t[tempered] <= 2.5)).all()


def test_per_batch_temperatures_share_one_draw():
    """explore_mode=per_batch (the paper's): one temperature for every row of a batch, drawn
    from [low, high] with probability prob, else 1."""
    g = torch.Generator().manual_seed(0)
    batches = [draw_temperatures(16, prob=0.6, low=0.5, high=2.0, generator=g, per_batch=True)
               for _ in range(400)]
    assert all(b.shape == (16,) and (b == b[0]).all() for b in batches)
    first = torch.stack([b[0] for b in batches])
    tempered = first != 1.0
    assert 0.5 < tempered.float().mean() < 0.7
    assert ((first[tempered] >= 0.5) & (first[tempered] <= 2.0)).all()


def test_logit_bias_is_added_before_the_temperature(tiny):
    """The policy's own bias (the paper's illegal-token penalty) is part of the logits that the
    exploration temperature divides: p = softmax((logits + bias) / T)."""
    model, tok = tiny
    prompt = torch.tensor(tok.encode("hi"))
    bias = torch.zeros(len(tok))
    bias[torch.arange(2, len(tok), 3)] = -3.0
    g = torch.Generator().manual_seed(2)
    r = sample(model, prompt, 6000, max_new_tokens=1, termination_token_id=1, generator=g,
               temperatures=2.0, logit_bias=bias)
    with torch.no_grad():
        logits = model(input_ids=prompt[None]).logits[0, -1].float()
    p = torch.softmax((logits + bias) / 2.0, -1)
    wrong = torch.softmax(logits / 2.0 + bias, -1)  # the bias after the temperature
    first = torch.where(r.terminated, torch.ones_like(r.lengths), r.tokens[:, 0])
    freq = torch.bincount(first, minlength=len(tok)).float() / 6000
    assert (freq - p).abs().max() < 0.025
    biased = bias < 0  # the mass on the biased tokens tells the two orders apart
    assert abs(float(freq[biased].sum() - p[biased].sum())) < 0.02
    assert float(p[biased].sum() - wrong[biased].sum()) > 0.05


def test_sample_validates(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="prompt_ids"):
        sample(model, torch.tensor([[1, 2]]), 2, max_new_tokens=2, termination_token_id=1)
    with pytest.raises(ValueError, match="min_new_tokens"):
        sample(
            model,
            torch.tensor([1, 2]),
            2,
            max_new_tokens=2,
            min_new_tokens=3,
            termination_token_id=1,
        )


def _reference_sample(model, prompt, B, T, term, temps, gen):
    """No KV cache, no compaction: recompute every row's full sequence at every step, drawing
    from the same generator in the same order as the sampler."""
    tokens = torch.zeros(B, 0, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.long)
    for _ in range(T):
        ids = torch.cat([prompt[None].expand(B, -1), tokens], 1)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        logits[done] = 0.0  # finished rows: the sampler keeps zeros there
        nxt = sample_categorical(torch.softmax(logits / temps[:, None], -1), gen)
        stop = (nxt == term) & ~done
        keep = ~done & ~stop
        tokens = torch.cat([tokens, torch.where(keep, nxt, 0)[:, None]], 1)
        lengths += keep.long()
        done |= stop
        if done.all():
            break
    return tokens, lengths, done


def test_sampler_matches_uncached_reference(tiny):
    """KV-cache reuse, batch expansion and dropping finished rows change nothing."""
    model, tok = tiny
    prompt = torch.tensor(tok.encode("n: "))
    term = tok.encode(",")[0]
    temps = torch.linspace(0.3, 3.0, 24)
    bias = torch.zeros(len(tok))
    bias[term] = 3.0  # termination likely: rows finish at different steps and are dropped
    r = sample(
        model,
        prompt,
        24,
        max_new_tokens=6,
        termination_token_id=term,
        temperatures=temps,
        vocab_bias=bias,
        generator=torch.Generator().manual_seed(5),
        pad_token_id=0,
    )
    biased = _BiasModel(model, bias, temps)
    ref_tokens, ref_lengths, ref_done = _reference_sample(
        biased, prompt, 24, 6, term, torch.ones(24), torch.Generator().manual_seed(5)
    )
    assert 0 < int(r.terminated.sum()) < 24 or len(set(r.lengths.tolist())) > 1
    assert r.lengths.tolist() == ref_lengths.tolist()
    assert r.terminated.tolist() == ref_done.tolist()
    T = r.tokens.shape[1]
    assert r.tokens.tolist() == ref_tokens[:, :T].tolist()


class _BiasModel(torch.nn.Module):
    """Folds the sampler's temperature and vocabulary bias into the logits (reference)."""

    def __init__(self, model, bias, temps):
        super().__init__()
        self.model, self.bias, self.temps = model, bias, temps

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        out.logits = out.logits.float() / self.temps[:, None, None] + self.bias
        return out


def test_scoring_fused_op_matches_reference(tiny):
    """The fused log-prob op gives the reference's values and gradients."""
    model, tok = tiny
    prompt = torch.tensor(tok.encode("q: "))
    tokens = torch.randint(2, len(tok), (4, 3))
    outs, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        log_pf, log_pterm = gfn_logprobs(model, prompt, tokens, 7, use_fused=fused)
        (log_pf.sum() + 0.5 * log_pterm.sum()).backward()
        outs.append((log_pf.detach(), log_pterm.detach()))
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_sampling_replica_decodes_like_eager(tiny):
    """compile_sampler: the compiled replica gives the eager replica's logits."""
    model, tok = tiny
    eager = SamplingReplica(model, torch.float32)
    compiled = SamplingReplica(model, torch.float32, compile=True)
    prompt = torch.tensor(tok.encode("n: 4"))
    runs = []
    for replica in (eager, compiled):
        r = sample(replica.sync(model), prompt, 3, max_new_tokens=3, termination_token_id=1,
                   generator=torch.Generator().manual_seed(0))
        runs.append(r)
    ids = torch.tensor([tok.encode("n: 12")])
    with torch.no_grad():
        want = eager.model(input_ids=ids).logits
        got = compiled.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert runs[1].tokens.shape[0] == 3 and (runs[1].lengths <= 3).all()


def test_a_prompt_per_row_samples_as_each_prompt_alone(tiny):
    """``prompt_ids [B, P]``: every row continues its own prompt, as one batch (the
    arithmetic evaluation's questions). Greedy rows equal the rows decoded from each prompt
    alone, two rows of one prompt agree, and a batch size that does not match the prompts is
    refused."""
    model, tok = tiny
    texts = ["ab: ", "xy: ", "ab: "]
    prompts = torch.tensor([tok.encode(t) for t in texts])
    term = tok.encode(",")[0]
    kw = dict(max_new_tokens=6, min_new_tokens=1, termination_token_id=term, pad_token_id=0)
    together = sample(model, prompts, batch_size=3, temperatures=0.0, **kw)
    for b in range(3):
        alone = sample(model, prompts[b], batch_size=1, temperatures=0.0, **kw)
        n = int(alone.lengths[0])
        assert int(together.lengths[b]) == n
        assert together.tokens[b, :n].tolist() == alone.tokens[0, :n].tolist()
    assert together.tokens[0].tolist() == together.tokens[2].tolist()
    with pytest.raises(ValueError, match="prompt_ids"):
        sample(model, prompts, batch_size=2, temperatures=0.0, **kw)
