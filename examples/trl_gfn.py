"""GFlowNet fine-tuning with TRL: the paper's random-number task through fastgfn's GFNTrainer.

    python examples/trl_gfn.py                       # a tiny random model, offline, seconds
    python examples/trl_gfn.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 150

The reward function follows TRL's convention (one value per completion); GFNTrainer reads the
value as the log-reward, so the policy learns to sample every valid integer equally often.
"""
import argparse
import re

import torch
from datasets import Dataset

from fastgfn.trainer.integrations.trl import GFNConfig, GFNTrainer

PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "


def valid_number(completions, **kwargs):
    """log R: 0 for an integer in [0, 100] written canonically, -20 for anything else."""
    return [0.0 if re.fullmatch(r"0|[1-9][0-9]*", c) and int(c) <= 100 else -20.0
            for c in completions]


def main(argv=None) -> GFNTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a hub name or directory (default: tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output_dir", default="runs/trl_gfn")
    a = parser.parse_args(argv)
    model, tokenizer = a.model, None
    if a.model is None:  # offline: the engine's tiny random Llama and a character tokenizer
        from fastgfn.trainer.integrations.tiny import tiny_causal_lm

        model, tokenizer = tiny_causal_lm()
    args = GFNConfig(output_dir=a.output_dir, max_steps=a.steps, loss="subtb", termination=",",
                     max_completion_length=4, num_generations=16, per_device_train_batch_size=16,
                     learning_rate=5e-5 if a.model else 1e-2, bf16=torch.cuda.is_available(),
                     logging_steps=5, report_to="none", save_strategy="no")
    trainer = GFNTrainer(model, valid_number, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": [PROMPT] * a.steps}))
    trainer.train()
    trainer.save_model(a.output_dir)
    trainer.create_model_card(model_name="trl_gfn")  # TRL's model card: README.md
    return trainer


if __name__ == "__main__":
    main()
