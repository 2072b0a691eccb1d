"""Evaluation: sample from the policy (temperature 1, no exploration, no vocabulary bias) and
score with the task's metrics; for the random-number task also the exact distribution over
the valid values (one teacher-forced pass over all of them) and a histogram PNG."""

from __future__ import annotations

import math

import torch

from fastgfn.engine import world_size
from fastgfn.sampler import sample
from fastgfn.scoring import gfn_logprobs


@torch.no_grad()
def sample_texts(engine, task, cfg, n: int, generator: torch.Generator, progress=None):
    """``n`` samples of the policy (split over ranks; gathered on every rank)."""
    model = engine.module
    was_training = model.training
    model.eval()
    per_rank = math.ceil(n / world_size())
    texts, terms = [], []
    done = 0
    with engine.param_context():
        while done < per_rank:
            b = min(cfg.eval_batch_size, per_rank - done)
            prompt = task.prompt_tokens((done // b) % task.num_prompts()).to(engine.device)
            r = sample(
                model,
                prompt,
                b,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=cfg.min_new_tokens,
                termination_token_id=task.termination_token_id,
                pad_token_id=_pad(task),
                generator=generator,
            )
            texts += [task.text(x) for x in r.rows()]
            terms += r.terminated.tolist()
            done += b
            if progress is not None:
                progress(b)
    model.train(was_training)
    if world_size() > 1:
        gathered = [None] * world_size()
        torch.distributed.all_gather_object(gathered, (texts, terms))
        texts = [t for g in gathered for t in g[0]]
        terms = [t for g in gathered for t in g[1]]
    return texts[:n], terms[:n]


def _pad(task) -> int:
    pad = getattr(task.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


@torch.no_grad()
def exact_number_distribution(engine, task, min_new_tokens: int = 0) -> dict:
    """Exact probability the policy gives each valid value (random-number task)."""
    model = engine.module
    was_training = model.training
    model.eval()
    values = list(range(task.low, task.high + 1))
    rows = [task.tokenizer.encode(str(v), add_special_tokens=False) for v in values]
    from fastgfn.replay import ReplayBuffer

    tokens, lengths = ReplayBuffer.to_tensors(rows, _pad(task))
    prompt = task.prompt_tokens(0).to(engine.device)
    with engine.param_context():
        log_pf, log_pterm = gfn_logprobs(
            model, prompt, tokens.to(engine.device), task.termination_token_id
        )
    model.train(was_training)
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    logq = (log_pf.float().cpu() * mask).sum(1) + log_pterm.float().cpu().gather(
        1, lengths[:, None]
    ).squeeze(1)
    if min_new_tokens >= 1:
        # the sampler forbids stopping at s_0: the first token is drawn from the rest
        logq = logq - torch.log1p(-log_pterm[0, 0].float().exp().clamp(max=1 - 1e-6)).cpu()
    mass = float(logq.exp().sum())
    cond = torch.softmax(logq, 0)
    kl = float((cond * (cond * len(values)).log()).sum())
    return {"exact_valid_mass": mass, "exact_kl_uniform": kl}


def evaluate(engine, task, cfg, generator, progress=None) -> dict:
    texts, terms = sample_texts(engine, task, cfg, cfg.eval_samples, generator, progress)
    metrics = task.evaluate(texts, terms)
    if getattr(task, "name", "") == "random_number":
        metrics.update(exact_number_distribution(engine, task, cfg.min_new_tokens))
    return metrics


def histogram(counts_before: dict, counts_after: dict, task, path) -> None:
    """Bar chart of sampled values before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(task.low, task.high + 1))
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for ax, counts, title in ((axes[0], counts_before, "before"), (axes[1], counts_after, "after")):
        if counts is None:
            ax.set_visible(False)
            continue
        n = max(1, sum(counts.values()))
        ax.bar(xs, [counts.get(x, 0) / n for x in xs], width=1.0)
        ax.axhline(1 / len(xs), color="k", lw=0.8, ls="--")
        ax.set_ylabel("frequency")
        ax.set_title(f"{title} fine-tuning (valid samples: {n})")
    axes[1].set_xlabel("value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(before: dict | None, after: dict) -> str:
    rows = [
        ("samples", "samples", "{:d}"),
        ("valid fraction", "valid_fraction", "{:.4f}"),
        ("distinct values", "distinct_values", "{:d}"),
        ("KL(empirical||uniform) nats", "kl_uniform", "{:.4f}"),
        ("exact valid mass", "exact_valid_mass", "{:.4f}"),
        ("exact KL(policy|valid||uniform)", "exact_kl_uniform", "{:.4f}"),
    ]
    lines = [
        f"| {'metric':<32} | {'before':>10} | {'after':>10} |",
        f"|{'-' * 34}|{'-' * 12}|{'-' * 12}|",
    ]
    for label, key, fmt in rows:
        if key not in after:
            continue
        b = fmt.format(before[key]) if before and key in before else "-"
        lines.append(f"| {label:<32} | {b:>10} | {fmt.format(after[key]):>10} |")
    return "\n".join(lines)
