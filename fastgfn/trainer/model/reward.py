"""The frozen reward LM of the tasks scored by one (continuation, reasoning, infilling,
arithmetic), and the scoring they compose from it (``RewardLM.score``: the prefix rewards and
the answer terms of one pass; the tasks never run the LM themselves).

``reward_model: initial`` (the default) is the initial policy, frozen: a copy of it, or with
LoRA the policy itself with its adapters disabled (no second copy). Any other value names a
causal LM with the policy's vocabulary (hub name, directory or .gguf), loaded frozen in the
policy's dtype, never with LoRA. Under ZeRO-3 the reward LM is partitioned like the policy
(each rank holds 1/world of its weights) and runs through an optimizer-less DeepSpeed engine
that gathers each layer for its forward; otherwise it is a plain replica on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from fastgfn.lm_logprobs import gfn_logprobs_from_hidden, lm_head_logprobs
from fastgfn.trainer.engines.distributed import zero3_init_context, zero_stage
from fastgfn.trainer.model.kv_cache import cache_kwarg, select_cache_rows
from fastgfn.trainer.model.loading import eval_mode, load_model
from fastgfn.trainer.scoring import hidden_states, prefix_log_likelihoods


@dataclasses.dataclass
class RewardLM:
    """A frozen causal LM that scores continuations."""

    model: torch.nn.Module
    adapters_off: bool = False  # the policy with its LoRA adapters disabled
    engine: object = None  # ZeRO-3: the inference engine that owns the partitioned model

    @contextlib.contextmanager
    def frozen(self):
        """``(model, device)``: the reward LM in eval mode (adapters disabled) inside the block."""
        ctx = self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with eval_mode(self.model), ctx:
            yield self.model, next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    # scoring: what the tasks scored by this LM ask of it ----------------------------------
    @torch.no_grad()
    def score(self, prompt_ids: torch.Tensor, tokens: torch.Tensor, termination_token_id: int,
              *, T: int | None = None, prefix_bias: torch.Tensor | None = None,
              answers=None, pad_token_id: int = 0, fused: bool = True):
        """One pass over the context X (``prompt_ids``, 1-D) and the padded rows ``tokens
        [B, W]``: ``(prefix, answer)``.

        - ``prefix`` (with ``T``; else None): ``[B, T + 1]`` float32 on the CPU, entry
          ``[b, t] = log p(z_1..z_t STOP | X)``, ``prefix_bias`` (``[V]`` or None) added to
          the logits of the rows' tokens (the illegal-token bias);
        - ``answer`` (with ``answers = (pairs, ids)``; else None): for each pair ``(b, t)``
          with its answer ids ``Y`` (``ids[i]``, lengths may differ), ``log p(Y | X z_1..z_t
          STOP)``, float32 ``[len(pairs)]`` on the CPU (``suffix_log_likelihood``)."""
        with self.frozen() as (model, dev):
            tokens = tokens.to(dev)
            out = hidden_states(model, prompt_ids.to(dev), tokens,
                                return_cache=answers is not None)
            h, cache = out if answers is not None else (out, None)
            prefix = answer = None
            if T is not None:
                log_pf, log_pterm = gfn_logprobs_from_hidden(
                    model, h, tokens, termination_token_id,
                    vocab_bias=None if prefix_bias is None else prefix_bias.to(h.device),
                    fused=fused)
                prefix = prefix_log_likelihoods(log_pf, log_pterm)[:, : T + 1].float().cpu()
            if answers is not None:
                answer = suffix_log_likelihood(model, cache, tokens, *answers,
                                               termination_token_id, pad_token_id, fused)
        return prefix, answer


def suffix_log_likelihood(model, cache, tokens, pairs, answers, termination_token_id: int,
                          pad: int, fused: bool) -> torch.Tensor:
    """For each pair ``(b, t)`` with its answer ids ``Y`` (``answers[i]``, lengths may
    differ): ``log p_LM(Y | X z_1..z_t STOP)``, float32 ``[len(pairs)]`` on the CPU, from
    ``cache``, the LM's KV cache of X ``tokens[b]`` (``tokens``: the padded rationales,
    ``[B, width]``); the cache is consumed. Each row's cache is copied once per pair, the
    attention mask hides its positions past X z_1..z_t, and only the 1 + |Y| tokens STOP Y
    run, at positions |X| + t onwards, for all pairs in one batch; the answer tokens'
    log-probs come through the fused lm_head op."""
    dev, n, width = tokens.device, len(pairs), tokens.shape[1]
    b_idx = torch.tensor([b for b, _ in pairs], dtype=torch.long)
    prefix = torch.tensor([t for _, t in pairs], dtype=torch.long)
    A = max(a.numel() for a in answers)
    # STOP Y, right-padded (causal: padding after Y changes nothing before it)
    suffix = torch.full((n, 1 + A), pad)
    suffix[:, 0] = termination_token_id
    lengths = torch.tensor([a.numel() for a in answers])
    for i, a in enumerate(answers):
        suffix[i, 1 : 1 + a.numel()] = a
    # one copy of its row's cache per pair, cut to X z_1..z_t by the attention mask
    # (cache positions P + t .. P + width - 1 hidden)
    select_cache_rows(cache, b_idx.to(dev))
    L = cache.get_seq_length()  # P + width
    P = L - width
    cols = torch.arange(L + 1 + A)
    visible = (cols[None] < P + prefix[:, None]) | (cols[None] >= L)
    positions = P + prefix[:, None] + torch.arange(1 + A)  # right after z_1..z_t
    # STOP Y after each prefix: the state after STOP Y_<k predicts Y_k
    h = model.get_decoder()(
        input_ids=suffix.to(dev),
        attention_mask=visible.to(dev, torch.long),
        position_ids=positions.to(dev),
        use_cache=True,
        **{cache_kwarg(model): cache},
    ).last_hidden_state[:, :A]
    logp = lm_head_logprobs(
        model, h.reshape(-1, h.shape[-1]), suffix[:, 1:].reshape(-1).to(dev), [], fused=fused,
    ).logp
    inside = torch.arange(A)[None] < lengths[:, None]
    return torch.where(inside, logp.float().cpu().view(n, A), 0.0).sum(1)


def build_reward_lm(cfg, policy, tokenizer, ds_config: dict | None) -> RewardLM:
    """The frozen reward LM for ``cfg`` (see the module docstring); ``policy`` is the initial
    policy as loaded (before any engine wraps it)."""
    if cfg.model.lora and cfg.task.reward_model == "initial":
        return RewardLM(policy, adapters_off=True)
    stage = zero_stage(ds_config)
    other = cfg.task.reward_model != "initial"
    # A whole policy (any stage but 3, or the tiny test model, built whole) is copied; a
    # ZeRO-3 policy is already partitioned, so the initial weights are loaded again.
    if not other and (stage != 3 or cfg.model.name == "tiny"):
        reward = copy.deepcopy(policy)
    else:
        load_cfg = cfg
        if other:
            load_cfg = cfg.replace(model=cfg.task.reward_model, gguf_file=None, lora=False)
        with zero3_init_context(ds_config):
            reward, _ = load_model(load_cfg, tokenizer=False)
    check_reward_vocab(cfg, reward, tokenizer)
    reward.eval().requires_grad_(False)
    if stage != 3:
        return RewardLM(reward)
    from fastgfn.trainer.engines.deepspeed_engine import frozen_zero3_module

    engine = frozen_zero3_module(reward, ds_config)
    return RewardLM(engine.module, engine=engine)


def check_reward_vocab(cfg, reward, tokenizer) -> None:
    """A reward LM scores the policy's token ids: its vocabulary must cover the policy's."""
    want = len(tokenizer) if tokenizer is not None else None
    got = int(reward.config.vocab_size)
    if want is not None and got < want:
        raise ValueError(
            f"reward_model: {cfg.task.reward_model!r} has a vocabulary of {got} tokens, "
            f"fewer than the policy's tokenizer ({want}); the reward LM must share the "
            "policy's tokenizer"
        )
