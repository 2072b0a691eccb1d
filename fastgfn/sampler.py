"""Batched sampling of continuations with no gradient, sharing one prompt's KV cache.

Every row of a batch continues the same prompt. The prompt runs once (batch 1); its KV cache
is expanded over the batch and decoding proceeds one token per step for all rows. A row
stops when it samples the termination token; afterwards it is fed ``pad_token_id`` and its
outputs are ignored. All rows decode the same number of steps; under ``torch.distributed``
the "every row is done" flag is all-reduced so that every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively inside each forward, so a rank that
stopped early would hang the others).

The behaviour policy may differ from the policy being trained (GFlowNet losses are
off-policy): a per-row temperature, an additive vocabulary bias (``-inf`` forbids a token)
and a minimum length (termination forbidden before it).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch

from fastgfn.attention import packed_decode_attention


@dataclass
class Rollout:
    """Sampled continuations of one prompt.

    ``tokens[b, t]`` is the t-th generated token of row b for ``t < lengths[b]`` and
    ``pad_token_id`` after it; the termination token itself is not stored (it is implied by
    ``terminated[b]``). ``lengths[b]`` counts generated tokens before termination; a row that
    reached ``max_new_tokens`` without terminating has ``terminated[b] = False``.
    """

    tokens: torch.Tensor  # [B, T] long
    lengths: torch.Tensor  # [B] long
    terminated: torch.Tensor  # [B] bool
    temperatures: torch.Tensor  # [B] float

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def rows(self) -> list[list[int]]:
        """The generated token ids of every row, without padding."""
        toks = self.tokens.tolist()
        return [r[:n] for r, n in zip(toks, self.lengths.tolist())]


def draw_temperatures(
    batch_size: int,
    *,
    prob: float,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Tempered exploration: with probability ``prob`` a row's temperature is drawn uniformly
    from ``[low, high]``, otherwise it is 1."""
    device = generator.device if generator is not None else None
    u = torch.rand(batch_size, generator=generator, device=device)
    t = low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
    return torch.where(u < prob, t, torch.ones_like(t))


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes a KV cache ("cache" from 5.2x,
    "past_key_values" before)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    params = inspect.signature(type(decoder).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def expand_cache(cache, batch_size: int):
    """Expand a batch-1 DynamicCache over ``batch_size`` rows without copying (views)."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
    return cache


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None):
    """One draw per row of ``probs [B, V]`` (rows need not be normalised): inverse CDF.

    Exactly the categorical distribution up to fp32 rounding of the cumulative sum, with one
    uniform per row; ``torch.multinomial`` draws V exponentials per row instead, which costs
    ~16 ms per step at V = 49152 on a CPU. Zero-probability tokens are never drawn.
    """
    cdf = probs.float().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    draw = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return draw.squeeze(1).clamp_(max=probs.shape[-1] - 1)


# Shortest rollout for which a prepacked transformers replica is chosen by default: measured
# on SmolLM2-135M at batch 32 (2-core CPU), sync + rollout of 4 tokens took 0.372 s packed vs
# 0.358 s plain, 8 tokens 0.585 vs 0.591 s. The lean decoder won at every length tried
# (0.310 s at 4 tokens), so it has no such threshold.
PACK_MIN_NEW_TOKENS = 8


class SamplingReplica:
    """A lower-precision copy of a policy used only to sample (e.g. bf16 on a CPU with
    AVX512-BF16, where decoding reads half the bytes per token).

    GFlowNet losses are off-policy, so the behaviour policy may differ slightly from the
    trained one; the loss itself always uses the full-precision teacher-forced pass. Only
    parameters are cast (buffers such as rotary frequencies keep their precision).
    ``sync(model)`` copies the current weights in before each rollout.

    ``compile=True`` compiles the replica's decoder body with ``torch.compile`` (dynamic
    shapes, so the growing KV cache does not recompile): decoding SmolLM2-135M at batch 16 on
    the project's 2-core CPU went from 2.09 s to 1.40 s per 30-token rollout, after a one-time
    compilation of about 5 minutes — worth it for long runs only.

    ``lean=True`` holds no transformers copy at all but a ``fastgfn.lean_decoder``
    ``LeanDecoder`` (prepacked weights and a decode loop with a fraction of transformers'
    per-token overhead); ``sync`` returns it and ``sample`` accepts it as the model. Otherwise
    ``pack=True`` keeps a transformers copy whose linear weights are prepacked for oneDNN at
    ``batch_hint`` rows (``fastgfn.packed_linear``): bit-identical logits, a rollout about
    1.3x faster, and no second dense copy of those weights.

    Both are chosen by default where they apply (bf16, a CPU with oneDNN bf16, not compiled;
    lean: a Llama-family model). Each ``sync`` then re-lays out every weight (about 0.1 s for
    SmolLM2-135M): the lean decoder repays that even on 4-token rollouts, prepacked layers only
    from about ``PACK_MIN_NEW_TOKENS`` tokens, so when ``max_new_tokens`` is given and shorter,
    a non-lean replica stays plain.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, compile: bool = False,
                 pack: bool | None = None, batch_hint: int = 16, lean: bool | None = None,
                 max_new_tokens: int | None = None):
        from fastgfn.lean_decoder import LeanDecoder, lean_decoder_unsupported
        from fastgfn.packed_linear import pack_linear_layers, packing_supported

        self.dtype = dtype
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        can_pack = on_cpu and packing_supported(dtype) and not compile
        if pack and not can_pack:
            raise ValueError(
                "pack: packed linear layers need a bf16 replica on a CPU with oneDNN bf16 "
                f"support and compile=False (dtype={dtype}, compile={compile})"
            )
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # Prepacking costs a re-layout of every weight per sync and saves time on every decoded
        # token: without the lean decoder, only rollouts long enough to repay it are packed.
        worth_packing = max_new_tokens is None or max_new_tokens >= PACK_MIN_NEW_TOKENS
        why_not_lean = lean_decoder_unsupported(model) if can_pack and pack is not False \
            else "it needs packed bf16 weights (pack=True on a CPU with oneDNN bf16)"
        if lean and why_not_lean is not None:
            raise ValueError(f"lean: cannot use the lean decoder: {why_not_lean}")
        self.lean = why_not_lean is None if lean is None else bool(lean)
        self.packed = self.lean or (can_pack and worth_packing if pack is None else bool(pack))
        if self.lean:  # no transformers copy at all: the decoder holds its own weights
            self.model = LeanDecoder(model, dtype, batch_hint)
            return
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for param in self.model.parameters():
            param.data = param.data.to(dtype)
        if self.packed:
            pack_linear_layers(self.model, batch_hint)
        if compile:
            decoder = self.model.get_decoder()
            decoder.forward = torch.compile(decoder.forward, dynamic=True)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module):
        """Load ``model``'s current weights; returns what ``sample`` decodes with."""
        if self.lean:
            return self.model.load(model)
        if self.packed:
            from fastgfn.packed_linear import repack_linear_layers

            repack_linear_layers(self.model, model)
            return self.model
        for dst, src in zip(self.model.parameters(), model.parameters()):
            dst.copy_(src)
        return self.model


def keep_in_rows(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Positions within ``rows`` (sorted) of the batch rows ``keep`` (a subset)."""
    return torch.searchsorted(rows, keep)


class _TransformersDecoding:
    """One rollout through a transformers model: the prompt once (batch 1), its KV cache
    expanded over the batch, then one token per step for the rows still running."""

    def __init__(self, model, prompt_ids, batch_size: int):
        self.model, self.kw = model, cache_kwarg(model)
        out = model(input_ids=prompt_ids[None], use_cache=True, logits_to_keep=1)
        self.cache = expand_cache(output_cache(out), batch_size)
        self.first_logits = out.logits[:, -1].expand(batch_size, -1)

    def keep_rows(self, index: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], use_cache=True, **{self.kw: self.cache})
        self.cache = output_cache(out)
        return out.logits[:, -1]


def _all_done(done: torch.Tensor) -> bool:
    flag = done.all().to(torch.int32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    batch_size: int,
    *,
    max_new_tokens: int,
    termination_token_id: int,
    min_new_tokens: int = 0,
    temperatures: torch.Tensor | float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    param_context=None,
) -> Rollout:
    """Sample ``batch_size`` continuations of ``prompt_ids`` (1-D) from ``model``.

    ``param_context`` is an optional context manager entered once around the whole rollout
    (the DeepSpeed engine passes one that gathers ZeRO-3 parameters once, not per token).
    """
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D tensor, got {tuple(prompt_ids.shape)}"
        )
    if vocab_bias is not None and vocab_bias.dim() == 2 and vocab_bias.shape[0] != batch_size:
        raise ValueError(
            f"vocab_bias must be [V] or [{batch_size}, V], got {tuple(vocab_bias.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
    device = prompt_ids.device
    B = batch_size
    if not torch.is_tensor(temperatures):
        temperatures = torch.full((B,), float(temperatures))
    temperatures = temperatures.to(device=device, dtype=torch.float32)
    if temperatures.shape != (B,):
        raise ValueError(f"temperatures must have shape ({B},), got {tuple(temperatures.shape)}")
    from fastgfn.lean_decoder import LeanDecoder

    lean = isinstance(model, LeanDecoder)
    ctx = param_context if param_context is not None else contextlib.nullcontext()
    with ctx, (contextlib.nullcontext() if lean else packed_decode_attention(model)):
        if lean:
            decoding = model.start(prompt_ids, B, max_new_tokens)
        else:
            decoding = _TransformersDecoding(model, prompt_ids, B)
        logits = decoding.first_logits
        tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # the rows the cache holds
        for t in range(max_new_tokens):
            z = logits.float() / temperatures[:, None]
            if vocab_bias is not None:
                z = z + vocab_bias.to(device=device, dtype=z.dtype)  # [V] or per row [B, V]
            if t < min_new_tokens:
                z = z.clone()
                z[:, termination_token_id] = float("-inf")
            probs = torch.softmax(z, dim=-1)
            nxt = sample_categorical(probs, generator)
            stop = (nxt == termination_token_id) & ~done
            keep = ~done & ~stop
            tokens[:, t] = torch.where(keep, nxt, torch.full_like(nxt, pad_token_id))
            lengths += keep.long()
            done |= stop
            if t == max_new_tokens - 1 or _all_done(done):
                break
            # Decode only the rows still running (at least one, so every rank runs a forward).
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:  # other ranks still decode: run a dummy row
                keep = rows[:1]
            if keep.numel() < rows.numel():
                decoding.keep_rows(keep_in_rows(rows, keep))
                rows = keep
            step_logits = decoding.step(tokens[rows, t])
            if rows.numel() == B:
                logits = step_logits
            else:
                logits = step_logits.new_zeros(B, step_logits.shape[-1])
                logits[rows] = step_logits
    T = int(lengths.max().item()) if B else 0
    return Rollout(tokens[:, : max(T, 1)].contiguous(), lengths, done.clone(), temperatures)
