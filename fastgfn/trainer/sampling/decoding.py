"""The decoding protocol the sampler runs on, and its transformers implementation.

A ``Decoder`` turns a prompt into a ``Decoding``: the next-token logits of every row after the
prompt, then one step per generated token for the rows still running. Two decoders implement
it: ``TransformersDecoder`` (any Hugging Face causal LM; the prompt runs once and its KV cache
is expanded over the batch) and ``lean_decoder.LeanDecoder`` (a bf16 Llama-family decoder
with prepacked weights, for the sampling replica on a CPU).
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch

from fastgfn.trainer.model.kv_cache import (
    cache_kwarg,
    expand_cache,
    output_cache,
    select_cache_rows,
)
from fastgfn.trainer.sampling.attention import packed_decode_attention


@runtime_checkable
class Decoding(Protocol):
    first_logits: torch.Tensor  # [B, V]: next-token logits of every row after the prompt

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (positions among the current rows)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per current row (``[R]``); the next-token logits ``[R, V]``."""


@runtime_checkable
class Decoder(Protocol):
    def decoding(self, prompt_ids: torch.Tensor, batch_size: int, max_new_tokens: int):
        """A context manager yielding the ``Decoding`` of one rollout of ``prompt_ids``."""


class TransformersDecoder:
    """``Decoder`` over a transformers causal LM (grouped-query attention packed at decode
    time on a CPU where that helps: ``attention.packed_decode_attention``)."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def decoding(self, prompt_ids: torch.Tensor, batch_size: int, max_new_tokens: int):
        with packed_decode_attention(self.model):
            yield _TransformersDecoding(self.model, prompt_ids, batch_size)


class _TransformersDecoding:
    """The prompt once (batch 1), its KV cache expanded over the batch, then one token per
    step for the rows still running. A 2-D ``prompt_ids [B, P]`` gives every row its own
    prompt (all of one length): they run as one batch."""

    def __init__(self, model, prompt_ids, batch_size: int):
        self.model, self.kw = model, cache_kwarg(model)
        if prompt_ids.dim() == 2:
            out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
            self.cache, self.first_logits = output_cache(out), out.logits[:, -1]
            return
        out = model(input_ids=prompt_ids[None], use_cache=True, logits_to_keep=1)
        self.cache = expand_cache(output_cache(out), batch_size)
        self.first_logits = out.logits[:, -1].expand(batch_size, -1)

    def keep_rows(self, index: torch.Tensor) -> None:
        select_cache_rows(self.cache, index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], use_cache=True, **{self.kw: self.cache})
        self.cache = output_cache(out)
        return out.logits[:, -1]


def as_decoder(model) -> Decoder:
    """A ``Decoder`` for ``model``: a transformers module is wrapped, a decoder is itself."""
    return TransformersDecoder(model) if isinstance(model, torch.nn.Module) else model
