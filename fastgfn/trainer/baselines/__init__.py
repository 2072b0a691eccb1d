"""The baselines the paper compares GFlowNet fine-tuning with, built on TRL (``pip install
'fastgfn[trl]'``). Like ``fastgfn.trainer.integrations``, each module here is imported only by
its users (the baseline commands and the tests), never by ``fastgfn`` or the engine, so TRL
stays an optional extra.

    sft.py   supervised fine-tuning on (prompt, completion) examples with an optional
             per-token loss mask: a thin wrapper of TRL's SFTTrainer
    rl.py    reward maximisation with TRL's GRPOTrainer, sampling through fastgfn's sampler
             (and its tools)
    command.py  what the two commands share: the run config and its model
"""
