"""Readable pure-PyTorch references: the oracle for every backend and the fallback on CPU."""
