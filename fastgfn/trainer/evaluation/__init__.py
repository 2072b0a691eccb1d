"""Evaluation: of the policy during a run (``in_training``: sampled and exact metrics, the
answer accuracy), and one command per task that compares a trained policy with the paper's
baselines on held-out data, each a folder with its ``__main__.py``:

    python -m fastgfn.trainer.evaluation.continuation   (fastgfn-eval-continuation)
    python -m fastgfn.trainer.evaluation.infilling      (fastgfn-eval-infilling)
    python -m fastgfn.trainer.evaluation.reasoning      (fastgfn-eval-reasoning: labels, M-step)
    python -m fastgfn.trainer.evaluation.arithmetic     (fastgfn-eval-arithmetic)

``loading`` is what they all load: the run config of their task, the base LM, the policies
(model directories, run directories, checkpoints) and the baselines' models."""
