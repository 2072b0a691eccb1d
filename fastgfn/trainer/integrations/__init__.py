"""fastgfn inside other training tools. Each module here is imported only by its users (``from
fastgfn.trainer.integrations.trl import GFNTrainer``), never by ``fastgfn`` or the engine, so
the tool it needs (TRL) stays an optional extra (``pip install 'fastgfn[trl]'``).

    trl.py, trl_config.py, trl_rewards.py   a GFlowNet trainer for TRL (docs/TRAINING.md)
    tiny.py                                 a tiny random Llama with a Hugging Face tokenizer
"""
