"""The story-infilling results table (paper section 4.2): the GFlowNet policy, the SFT
baseline and prompting of the base LM on the held-out stories, scored against the reference
middle sentence by BLEU-4, GLEU-4 and BERTScore, and by the infilling reward under the base LM.

``python -m fastgfn.trainer.evaluation.infilling --help``; the command is ``cli.py``, the metrics
``metrics.py``.
"""
