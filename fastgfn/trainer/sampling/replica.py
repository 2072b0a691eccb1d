"""The sampling replica: a lower-precision copy of the policy that only samples, synced from
the policy before every rollout, and the choice of whether a run uses one (``sample_dtype``).
"""

from __future__ import annotations

import copy

import torch

from fastgfn.trainer.reporting.machine import native_bf16_matmuls
from fastgfn.trainer.sampling.decoding import Decoder, TransformersDecoder


def resolve_sample_dtype(requested: str, model, zero_stage: int) -> str:
    """``sample_dtype``: 'auto' gives a bf16 replica for an fp32 policy on a CPU with native
    bf16 matmuls (decoding reads half the bytes; not under ZeRO-3, whose weights are
    partitioned), otherwise 'model' (sample with the policy itself)."""
    if requested != "auto":
        return requested
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype == torch.float32 and native_bf16_matmuls():
        return "bfloat16" if zero_stage != 3 else "model"
    return "model"


def build_replica(engine, sampling) -> SamplingReplica | None:
    """The run's sampling replica (from its ``sampling`` section), or None when it samples
    with the policy itself."""
    sample_dtype = resolve_sample_dtype(sampling.sample_dtype, engine.module, engine.zero_stage)
    if sample_dtype == "model":
        if sampling.compile_sampler:
            raise ValueError(
                "compile_sampler: needs a sampling replica (sample_dtype=bfloat16, float16 or "
                f"float32); sample_dtype={sampling.sample_dtype!r} samples with the policy itself"
            )
        return None
    if engine.zero_stage == 3:
        raise ValueError("sample_dtype: a sampling replica needs whole weights, not ZeRO-3")
    return SamplingReplica(engine.module, getattr(torch, sample_dtype),
                           compile=sampling.compile_sampler, batch_hint=sampling.batch_size,
                           max_new_tokens=sampling.max_new_tokens)


# Shortest rollout for which a prepacked transformers replica is chosen by default: each sync
# re-lays out every weight, which shorter rollouts do not repay (measured: bench/RESULTS.md,
# "End-to-end step"). The lean decoder repays it at every length tried, so it has no threshold.
PACK_MIN_NEW_TOKENS = 8


class SamplingReplica:
    """A lower-precision copy of a policy used only to sample (e.g. bf16 on a CPU with
    AVX512-BF16, where decoding reads half the bytes per token).

    GFlowNet losses are off-policy, so the behaviour policy may differ slightly from the
    trained one; the loss itself always uses the full-precision teacher-forced pass. Only
    parameters are cast (buffers such as rotary frequencies keep their precision).
    ``sync(model)`` copies the current weights in before each rollout.

    ``compile=True`` compiles the replica's decoder body with ``torch.compile`` (dynamic
    shapes, so the growing KV cache does not recompile): faster decoding after a one-time
    compilation of minutes, worth it for long runs only.

    ``lean=True`` holds no transformers copy at all but a ``lean_decoder.LeanDecoder``
    (prepacked weights and a decode loop with a fraction of transformers' per-token
    overhead), which ``sync`` returns. Otherwise
    ``pack=True`` keeps a transformers copy whose linear weights are prepacked for oneDNN at
    ``batch_hint`` rows (``packed_linear``): bit-identical logits, a faster rollout, and no
    second dense copy of those weights.

    Both are chosen by default where they apply (bf16, a CPU with oneDNN bf16, not compiled;
    lean: a Llama-family model). Each ``sync`` then re-lays out every weight: the lean decoder
    repays that even on 4-token rollouts, prepacked layers only from about
    ``PACK_MIN_NEW_TOKENS`` tokens, so when ``max_new_tokens`` is given and shorter, a non-lean
    replica stays plain.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, compile: bool = False,
                 pack: bool | None = None, batch_hint: int = 16, lean: bool | None = None,
                 max_new_tokens: int | None = None):
        from fastgfn.trainer.sampling.lean_decoder import LeanDecoder, lean_decoder_unsupported
        from fastgfn.trainer.sampling.packed_linear import pack_linear_layers, packing_supported

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
    def sync(self, model: torch.nn.Module) -> Decoder:
        """Load ``model``'s current weights; returns the decoder ``sample`` runs on."""
        if self.lean:
            return self.model.load(model)
        if self.packed:
            from fastgfn.trainer.sampling.packed_linear import repack_linear_layers

            repack_linear_layers(self.model, model)
        else:
            for dst, src in zip(self.model.parameters(), model.parameters()):
                dst.copy_(src)
        return TransformersDecoder(self.model)


