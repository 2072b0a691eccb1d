"""A lean bf16 decoder for Llama-family models, used to sample on a CPU.

Sampling runs one decoder step per generated token for a small batch, so a step costs little
arithmetic and a lot of per-operation overhead: transformers' modelling code issues some 60
tensor operations per layer per step (masks, rotary tables, cache concatenation, views,
dtype round trips). ``LeanDecoder`` runs the same maths in about 20, from weights it holds
itself:

    x   = embed[token]
    per layer:
      h   = rms_norm(x) * w_in                        (fp32 statistics, as transformers)
      q|k|v = h [Wq; Wk; Wv]^T (+ biases)             (one fused, oneDNN-prepacked matmul)
      q, k = rope(q, k, position)                     (tables from the model's own rotary
                                                       module, so its RoPE scaling is kept)
      K[:, :, pos] = k,  V[:, :, pos] = v            (a preallocated cache, written in place)
      o   = softmax(q K^T / sqrt(d)) V                (grouped-query heads packed per kv head)
      x   = x + o Wo^T
      h   = rms_norm(x) * w_post
      g|u = h [Wg; Wu]^T                              (one fused matmul)
      x   = x + (silu(g) * u) Wd^T
    logits = rms_norm(x) * w_final  Wlm^T

It agrees with transformers' own bf16 forward to bf16 rounding (the fused matmuls may add
in a different order); its speed against transformers is in bench/RESULTS.md, "End-to-end step".

Only plain Llama-style models qualify (``lean_decoder_unsupported`` says why not): model
types llama, mistral and qwen2, SiLU MLP, RMSNorm, every layer full attention, RoPE that does
not depend on the sequence length, no LoRA adapters. The sampler falls back to transformers
for anything else. Inference only: no gradient flows through it.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from fastgfn.trainer.sampling.packed_linear import pack_weight, packed_matmul, packing_supported

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_type(config) -> str:
    for key in ("rope_parameters", "rope_scaling"):
        params = getattr(config, key, None)
        if isinstance(params, dict):
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def lean_decoder_unsupported(model) -> str | None:
    """Why ``model`` cannot use the lean decoder, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of " \
               f"{SUPPORTED_MODEL_TYPES}"
    if hasattr(model, "peft_config"):
        return "LoRA adapters are not folded into the lean decoder"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "sliding-window layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.model_type == "mistral":
        return "sliding-window attention"
    if _rope_type(config) in _LENGTH_DEPENDENT_ROPE:
        return f"RoPE type {_rope_type(config)!r} depends on the sequence length"
    for layer in model.get_decoder().layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                  layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                  layer.mlp.down_proj):
            if type(m) is not torch.nn.Linear:
                return f"{type(m).__name__} is not a plain nn.Linear"
        if layer.mlp.down_proj.bias is not None or layer.mlp.gate_proj.bias is not None:
            return "MLP biases"
    return None


class LeanDecoder:
    """Prepacked bf16 weights of a Llama-family model and a decode loop over them.

    ``load(model)`` (re)loads the weights of a model of the same architecture, in any dtype;
    ``start(prompt_ids, batch_size, max_new_tokens)`` runs the prompt once and returns a
    ``LeanDecoding`` that yields next-token logits for every row, step by step (the
    ``decoding.Decoder`` protocol: ``decoding(...)``, the same as a context manager).
    """

    def __init__(self, model, dtype: torch.dtype = torch.bfloat16, batch_hint: int = 16):
        reason = lean_decoder_unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder: unsupported model: {reason}")
        if not packing_supported(dtype):
            raise ValueError(f"LeanDecoder: dtype {dtype} has no oneDNN packed matmul here")
        if batch_hint < 1:
            raise ValueError(f"batch_hint must be >= 1, got {batch_hint}")
        config = model.config
        self.dtype = dtype
        self.batch_hint = batch_hint
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.intermediate = config.intermediate_size
        self.eps = float(config.rms_norm_eps)
        self.rotary = copy.deepcopy(model.get_decoder().rotary_emb).float()
        self._staging = torch.empty(0, dtype=dtype)
        self.load(model)

    # weights --------------------------------------------------------------------------------
    def _pack(self, *weights: torch.Tensor) -> torch.Tensor:
        """One prepacked matrix of the row-stacked ``weights``: each is cast straight into its
        rows of a reused staging buffer, which oneDNN then copies into its own layout."""
        rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
        if self._staging.numel() < rows * cols:
            self._staging = torch.empty(rows * cols, dtype=self.dtype)
        stacked = self._staging[: rows * cols].view(rows, cols)
        start = 0
        for w in weights:
            stacked[start:start + w.shape[0]].copy_(w.detach())
            start += w.shape[0]
        return pack_weight(stacked, self.dtype, self.batch_hint)

    def _vec(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(self.dtype, copy=True)

    @torch.no_grad()
    def load(self, model) -> LeanDecoder:
        """Pack the current weights of ``model`` (same architecture as at construction)."""
        decoder = model.get_decoder()
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_bias = None
            if attn.q_proj.bias is not None:
                qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            self.layers.append({
                "norm_in": self._vec(layer.input_layernorm.weight),
                "qkv": self._pack(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                "qkv_bias": self._vec(qkv_bias),
                "o": self._pack(attn.o_proj.weight),
                "o_bias": self._vec(attn.o_proj.bias),
                "norm_post": self._vec(layer.post_attention_layernorm.weight),
                "gate_up": self._pack(mlp.gate_proj.weight, mlp.up_proj.weight),
                "down": self._pack(mlp.down_proj.weight),
            })
        self.embed = self._vec(decoder.embed_tokens.weight)
        self.norm_final = self._vec(decoder.norm.weight)
        head = model.get_output_embeddings()
        self.lm_head = self._pack(head.weight)
        self.lm_head_bias = self._vec(getattr(head, "bias", None))
        return self

    # maths ----------------------------------------------------------------------------------
    def _rms_norm(self, x, weight):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(self.dtype)

    def rope_tables(self, length: int):
        """cos and signed sin at positions 0..length-1 ([length, D], the model's dtype), so that
        rope(x) = x * cos + swap_halves(x) * sin_signed equals transformers' rotate_half form."""
        pos = torch.arange(length)[None]
        cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype), pos)
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def forward(self, tokens, start: int, cache, rope):
        """Run ``tokens [R, S]`` at positions start..start+S-1 against ``cache`` (rows aligned
        with ``tokens``); returns the final-position logits ``[R, V]``."""
        R, S = tokens.shape
        Hq, Hk, D = self.n_heads, self.n_kv, self.head_dim
        cos, sin = rope[0][start:start + S], rope[1][start:start + S]  # [S, D]
        cos, sin = cos[None, :, None], sin[None, :, None]  # broadcast over rows and heads
        x = self.embed[tokens]  # [R, S, H]
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w["norm_in"])
            qkv = packed_matmul(h, w["qkv"], w["qkv_bias"])
            qk = qkv[..., : (Hq + Hk) * D].view(R, S, Hq + Hk, D)
            swapped = qk.view(R, S, Hq + Hk, 2, D // 2).flip(3).view(R, S, Hq + Hk, D)
            qk = qk * cos + swapped * sin
            k_cache, v_cache = cache[i]
            k_cache[:, :, start:start + S] = qk[:, :, Hq:].transpose(1, 2)
            v_cache[:, :, start:start + S] = qkv[..., (Hq + Hk) * D:].view(R, S, Hk, D) \
                .transpose(1, 2)
            keys, values = k_cache[:, :, : start + S], v_cache[:, :, : start + S]
            if S == 1:  # one query per row: the query heads of a kv head are its rows
                q = qk[:, 0, :Hq].reshape(R, Hk, Hq // Hk, D)
                o = F.scaled_dot_product_attention(q, keys, values)  # [R, Hk, G, D]
                o = o.reshape(R, 1, Hq * D)
            else:  # the prompt: causal over positions 0..S-1 (start == 0)
                q = qk[:, :, :Hq].transpose(1, 2)
                o = F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                   enable_gqa=Hq != Hk)
                o = o.transpose(1, 2).reshape(R, S, Hq * D)
            x = x + packed_matmul(o, w["o"], w["o_bias"])
            h = self._rms_norm(x, w["norm_post"])
            gate_up = packed_matmul(h, w["gate_up"])
            act = F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate:]
            x = x + packed_matmul(act, w["down"])
        h = self._rms_norm(x[:, -1], self.norm_final)
        return packed_matmul(h, self.lm_head, self.lm_head_bias)

    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, batch_size: int, max_new_tokens: int):
        return LeanDecoding(self, prompt_ids, batch_size, max_new_tokens)

    @contextlib.contextmanager
    def decoding(self, prompt_ids: torch.Tensor, batch_size: int, max_new_tokens: int):
        yield self.start(prompt_ids, batch_size, max_new_tokens)


class LeanDecoding:
    """One rollout: the prompt's cache copied to every row, then one token per step."""

    def __init__(self, decoder: LeanDecoder, prompt_ids, batch_size: int, max_new_tokens: int):
        d = decoder
        if prompt_ids.dim() != 1:
            raise ValueError("prompt_ids: the lean decoder continues one prompt (1-D), got "
                             f"shape {tuple(prompt_ids.shape)}")
        P = prompt_ids.numel()
        self.decoder, self.position = d, P
        length = P + max_new_tokens
        self.rope = d.rope_tables(length)
        shape = (batch_size, d.n_kv, length, d.head_dim)
        self.cache = [(torch.empty(shape, dtype=d.dtype), torch.empty(shape, dtype=d.dtype))
                      for _ in d.layers]
        prompt_cache = [(k[:1], v[:1]) for k, v in self.cache]
        logits = d.forward(prompt_ids[None], 0, prompt_cache, self.rope)
        for k, v in self.cache:  # every row continues the same prompt
            k[1:, :, :P] = k[:1, :, :P]
            v[1:, :, :P] = v[:1, :, :P]
        self.first_logits = logits.expand(batch_size, -1)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the cache rows ``index`` (positions among the current rows)."""
        self.cache = [(k[index], v[index]) for k, v in self.cache]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per current row (``[R]``); returns the next-token logits ``[R, V]``."""
        logits = self.decoder.forward(tokens[:, None], self.position, self.cache, self.rope)
        self.position += 1
        return logits
