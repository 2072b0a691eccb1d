"""``python -m fastgfn.trainer.evaluation.reasoning``: accuracy on a label task (the
paper's SUBJ) of zero-shot and few-shot prompting, supervised fine-tuning, and a
GFlowNet-fine-tuned policy with and without the paper's M-step (``cli.py``; scoring and
classifier training in ``core.py``)."""
