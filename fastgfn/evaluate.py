"""Evaluation: sample from the policy (temperature 1, no exploration, no vocabulary bias) and
score with the task's metrics; for the random-number task also the exact distribution over
the valid values (one teacher-forced pass over all of them) and a histogram PNG."""

from __future__ import annotations

import math

import torch

from fastgfn.engine import rank, world_size
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
            r = _policy_samples(engine, task, cfg, (done // b) % task.num_prompts(), b, generator)
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


def _policy_samples(engine, task, cfg, prompt_index: int, n: int, generator):
    """``n`` continuations of prompt ``prompt_index`` from the policy as it is (temperature 1,
    no exploration, no vocabulary bias), within the run's length limits."""
    return sample(
        engine.module,
        task.prompt_tokens(prompt_index).to(engine.device),
        n,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        termination_token_id=task.termination_token_id,
        pad_token_id=_pad(task),
        generator=generator,
    )


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


def evaluate(engine, task, cfg, generator, progress=None, answer_task=None) -> dict:
    """Sampled metrics of the task; the exact distribution for the random-number task; the
    answer accuracy on ``answer_task`` (reasoning task, ``eval_rationales > 0``)."""
    texts, terms = sample_texts(engine, task, cfg, cfg.eval_samples, generator, progress)
    metrics = task.evaluate(texts, terms)
    if getattr(task, "name", "") == "random_number":
        metrics.update(exact_number_distribution(engine, task, cfg.min_new_tokens))
    if answer_task is not None and cfg.eval_rationales > 0:
        metrics.update(answer_accuracy(engine, answer_task, cfg, generator))
    return metrics


@torch.no_grad()
def answer_accuracy(engine, task, cfg, generator) -> dict:
    """Reasoning task, on its first ``eval_questions`` questions (0: all): for each,
    ``eval_rationales`` rationales from the policy (temperature 1, no exploration), then the
    reward LM's probability of each choice after each rationale, normalised over the
    choices, ``p(c | X z) = p(Y_c | X z STOP) / sum_c' p(Y_c' | X z STOP)``. The prediction
    is the choice with the largest mean of ``p(c | X z)`` over the rationales (the paper's
    "sample rationales, then the answer" classifier); the zero-shot prediction uses the empty
    rationale (``X STOP Y_c``). Questions are split over the ranks, each rank taking the same
    number (ZeRO-3: the same calls), and the counts are summed."""
    model = engine.module
    choices = task.choices
    n = task.num_prompts() if cfg.eval_questions <= 0 else min(cfg.eval_questions,
                                                                task.num_prompts())
    world = world_size()
    per_rank = math.ceil(n / world)
    counts = torch.zeros(3, dtype=torch.float64)  # questions, correct, zero-shot correct
    was_training = model.training
    model.eval()
    for j in range(per_rank):
        i = rank() * per_rank + j
        real = i < n
        i = i % n  # padding: a repeat that is not counted
        with engine.param_context():
            r = _policy_samples(engine, task, cfg, i, cfg.eval_rationales, generator)
        ll = task.choice_log_likelihoods(i, r.rows(), choices)  # [rationales, C]
        pred = int(ll.log_softmax(1).exp().mean(0).argmax())
        zero = int(task.choice_log_likelihoods(i, [[]], choices)[0].argmax())
        if real:
            truth = task.answers[i]
            counts += torch.tensor([1.0, choices[pred] == truth, choices[zero] == truth],
                                   dtype=torch.float64)
    model.train(was_training)
    if world > 1:
        counts = counts.to(engine.device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    total = max(1.0, float(counts[0]))
    return {
        "answer_questions": int(counts[0]),
        "answer_accuracy": float(counts[1]) / total,
        "zero_shot_accuracy": float(counts[2]) / total,
    }


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
        ("answer questions", "answer_questions", "{:d}"),
        ("answer accuracy (rationales)", "answer_accuracy", "{:.4f}"),
        ("answer accuracy (zero-shot)", "zero_shot_accuracy", "{:.4f}"),
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
