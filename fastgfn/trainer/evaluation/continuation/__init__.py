"""The sentence-continuation results table (paper section 4.1): a trained policy against
decoding baselines of the base LM on the held-out prompts, scored by log-likelihood under the
frozen base LM and by the diversity of sentence embeddings.

``python -m fastgfn.trainer.evaluation.continuation --help``; the command is ``cli.py``, the
methods ``methods.py`` (diverse beam search: ``diverse_beam.py``), the metrics
``metrics.py``, the sentence-embedding models ``embeddings.py``, the files ``report.py``.
"""
