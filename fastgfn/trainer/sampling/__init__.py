"""Sampling continuations with no gradient: the batched sampler (``sampler``), the decoding
protocol it runs on (``decoding``), the low-precision sampling replica (``replica``) and its
CPU fast paths (``lean_decoder``, ``packed_linear``, ``attention``)."""
