"""What a run shows at the end: the before/after table of the evaluation metrics and the
histogram of sampled values (random-number task)."""

from __future__ import annotations


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
        ("answer accuracy (greedy rationale)", "answer_accuracy_greedy", "{:.4f}"),
        ("answer accuracy (majority vote)", "answer_accuracy_majority", "{:.4f}"),
        ("answer accuracy (mean probability)", "answer_accuracy", "{:.4f}"),
        ("answer accuracy (zero-shot)", "zero_shot_accuracy", "{:.4f}"),
        ("terminated fraction", "terminated_fraction", "{:.4f}"),
        ("rationales with an answer", "with_answer_fraction", "{:.4f}"),
        ("arithmetic questions", "greedy_accuracy_questions", "{:d}"),
        ("exact-match accuracy (greedy, tool)", "greedy_accuracy", "{:.4f}"),
    ]
    lines = [
        f"| {'metric':<36} | {'before':>10} | {'after':>10} |",
        f"|{'-' * 38}|{'-' * 12}|{'-' * 12}|",
    ]
    for label, key, fmt in rows:
        if key not in after:
            continue
        b = fmt.format(before[key]) if before and key in before else "-"
        lines.append(f"| {label:<36} | {b:>10} | {fmt.format(after[key]):>10} |")
    return "\n".join(lines)
