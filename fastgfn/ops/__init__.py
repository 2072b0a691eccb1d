"""Registered torch ops (``torch.ops.fastgfn.*``) with autograd, fake tensors and dispatch."""
