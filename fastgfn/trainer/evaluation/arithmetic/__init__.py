"""``python -m fastgfn.trainer.evaluation.arithmetic``: exact-match accuracy on the arithmetic test
sets (3 and 4 operands in distribution, 5 out of distribution) of a trained policy and its
baselines, every rationale decoded with the calculator active (``cli.py``)."""
