"""Prepacked bf16 linear layers for CPU decoding (oneDNN), used by the sampling replica.

Decoding multiplies a few rows (the batch) by every weight matrix once per token, so its
matmuls are small-M and bound by how fast the weights stream in. oneDNN can keep a weight in
its own blocked layout, prepared once for a given batch size ("prepacked"), instead of
re-laying it out inside every call. The result is bit-identical to ``F.linear`` on the same
bf16 weight, and faster on CPUs with native bf16 matmuls (bench/RESULTS.md, "End-to-end step").

``pack_linear_layers(model, batch_hint)`` switches every ``nn.Linear`` of a bf16 CPU model to
a packed weight and frees its dense weight (unless another module shares it, as a tied
embedding does); ``repack_linear_layers(model, source)`` loads new weights from a model of the
same architecture in any dtype (one conversion and one re-layout per weight). A packed model
is for inference only: no gradient flows through it.
"""

from __future__ import annotations

import types

import torch

from fastgfn.trainer.reporting.machine import native_bf16_matmuls

_PACKED = "_fastgfn_packed_weight"


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run oneDNN's packed linear at ``dtype`` (bf16 only:
    the fp32 path is not faster, and fp16 needs AVX512-FP16)."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return native_bf16_matmuls()


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, batch_hint: int) -> torch.Tensor:
    """``weight [out, in]`` cast to ``dtype`` and laid out by oneDNN for ``packed_matmul`` on
    inputs of about ``batch_hint`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), batch_hint)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None):
    """``x W^T (+ bias)`` for a weight from ``pack_weight``; exactly ``F.linear`` on it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_forward(self, x):
    return packed_matmul(x, getattr(self, _PACKED), self.bias)


def _linear_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def pack_linear_layers(model: torch.nn.Module, batch_hint: int) -> list[str]:
    """Pack every ``nn.Linear`` of ``model`` (bf16, on the CPU) for inputs of about
    ``batch_hint`` rows (any number of rows stays exact). Returns the packed layers' names."""
    if batch_hint < 1:
        raise ValueError(f"batch_hint must be >= 1, got {batch_hint}")
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or not packing_supported(param.dtype):
        raise ValueError("pack_linear_layers: needs a bf16 model on a CPU with oneDNN bf16")
    layers = _linear_layers(model)
    linear_ids = {id(m) for _, m in layers}
    shared = {  # weights that a non-linear module (e.g. a tied embedding) also reads
        id(p) for m in model.modules() if id(m) not in linear_ids
        for p in m.parameters(recurse=False)
    }
    for _, module in layers:
        setattr(module, _PACKED, pack_weight(module.weight, param.dtype, batch_hint))
        module._fastgfn_batch_hint = batch_hint
        module.forward = types.MethodType(_packed_forward, module)
        if id(module.weight) not in shared:
            module.weight.data = module.weight.data.new_empty(0)  # the packed copy replaces it
    return [name for name, _ in layers]


@torch.no_grad()
def repack_linear_layers(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Load the weights of ``source`` (same architecture, any dtype) into the packed model:
    packed layers are re-laid out, every other parameter (including shared ones) copied."""
    packed = set()
    for name, module in _linear_layers(model):
        if hasattr(module, _PACKED):
            src = source.get_submodule(name)
            setattr(module, _PACKED, pack_weight(src.weight, getattr(module, _PACKED).dtype,
                                                 module._fastgfn_batch_hint))
            packed.add(id(module.weight))
    for dst, src in zip(model.parameters(), source.parameters()):
        if dst.numel() == 0 and id(dst) in packed:
            continue  # lives only in its packed copy
        dst.copy_(src)
