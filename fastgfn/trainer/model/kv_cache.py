"""The transformers KV cache as the engine uses it: one prompt's cache shared by a batch.

A prompt runs once (batch 1); its cache is expanded over the batch without copying, so the
rows that continue it decode (sampling) or run teacher-forced (scoring, with gradient: the
prompt's gradient then accumulates once) against the same keys and values.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes a KV cache ("cache" from 5.2x,
    "past_key_values" before)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    params = inspect.signature(type(decoder).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a transformers forward returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def expand_cache(cache, batch_size: int):
    """Expand a batch-1 DynamicCache over ``batch_size`` rows without copying (views)."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
    return cache


def select_cache_rows(cache, index: torch.Tensor):
    """Keep (or repeat) the cache rows ``index`` in every layer; returns the cache."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    return cache
