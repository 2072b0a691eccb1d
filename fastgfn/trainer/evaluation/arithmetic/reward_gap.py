"""``python -m fastgfn.trainer.evaluation.arithmetic.reward_gap``: does the reward prefer the
correct rationale to the wrong ones a GFlowNet can also write?

For each training problem with a worked rationale, the untempered log-reward (as the trainer
computes it, ``Task.state_log_rewards``) at every state of that rationale that ends right
after a calculator result: the complete shorter rationales, " 6 - 0 = 6" for
" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6", whose last number is not the answer, then the correct
one. Prints and writes (``--out``, JSON) per problem those values and a summary: how often a
shorter, wrong rationale scores higher than the correct one, by how much the correct one
leads, and the share of the target's mass the correct one holds among them at reward
temperature ``T`` (``exp(log R / T)`` normalised over the rationale and its prefixes).

    python -m fastgfn.trainer.evaluation.arithmetic.reward_gap --config configs/arithmetic.yaml \\
        --out runs/reward_gap.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def result_states(mask: list[bool]) -> list[int]:
    """The states (counted in actions) that end right after a run of tool tokens."""
    actions, ends = 0, []
    for t, is_action in enumerate(mask):
        actions += is_action
        if not is_action and (t + 1 == len(mask) or mask[t + 1]):
            ends.append(actions)
    return ends


@torch.no_grad()
def reward_gaps(task) -> list[dict]:
    """Per worked rationale: ``{"prompt", "text", "log_rewards"}``, the log-rewards at its
    result states, the full rationale last."""
    from fastgfn.trainer.replay_seed import scored_worked_rows

    out = []
    for w in scored_worked_rows(task):
        ends = result_states(w.mask)
        if not ends or ends[-1] != sum(w.mask):
            ends.append(sum(w.mask))  # a rationale that does not end with a result
        out.append({"prompt": w.prompt, "text": task.text(w.row),
                    "log_rewards": [float(w.log_rewards[n]) for n in ends]})
    return out


def summary(gaps: list[dict], temperatures=(1.0, 0.5)) -> dict:
    several = [g["log_rewards"] for g in gaps if len(g["log_rewards"]) > 1]
    leads = [r[-1] - max(r[:-1]) for r in several]

    def share(r, T):
        top = max(x / T for x in r)
        return math.exp(r[-1] / T - top) / sum(math.exp(x / T - top) for x in r)

    return {
        "problems": len(gaps),
        "with_shorter_rationales": len(several),
        "wrong_scores_higher": sum(lead < 0 for lead in leads),
        "mean_lead_nats": sum(leads) / len(leads) if leads else None,
        "min_lead_nats": min(leads, default=None),
        "max_lead_nats": max(leads, default=None),
        "correct_share": {str(T): sum(share(r, T) for r in several) / len(several)
                          for T in temperatures} if several else {},
        "mean_correct_log_reward": sum(g["log_rewards"][-1] for g in gaps) / len(gaps)
        if gaps else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastgfn.trainer.evaluation.arithmetic.reward_gap",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="a JSON file")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    from fastgfn.trainer.evaluation.loading import load_base, load_run_config
    from fastgfn.trainer.model.reward import RewardLM
    from fastgfn.trainer.tasks import build_task

    cfg = load_run_config(args.config, args.overrides, "arithmetic")
    model, tokenizer = load_base(cfg)
    task = build_task(cfg, tokenizer, RewardLM(model))
    gaps = reward_gaps(task)
    report = {"config": args.config, "overrides": args.overrides, "summary": summary(gaps),
              "problems": gaps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
