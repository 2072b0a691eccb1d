"""The evaluation's outputs: ``results.json`` (settings, per-method averages, per-prompt
metrics and samples), ``table.md`` (one row per method) and ``ll_vs_diversity.png`` (one
point per method: log-likelihood against diversity)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(summary: dict, meta: dict) -> str:
    """The table: one row per method, then a note on what the numbers are."""
    head = ("| method | max log p (reward) | mean log p (reward) | max log p (plain LM) "
            "| mean log p (plain LM) | diversity | not terminated | mean tokens |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for m in summary.values():
        not_term = f"{m['not_terminated']} / {m['samples']}"
        lines.append(
            f"| {m['label']} | {_fmt(m['max_ll'])} | {_fmt(m['mean_ll'])} "
            f"| {_fmt(m['max_ll_plain'])} | {_fmt(m['mean_ll_plain'])} "
            f"| {_fmt(m['diversity'], 3)} | {not_term} | {_fmt(m['mean_tokens'], 1)} |"
        )
    bias = meta["illegal_token_bias"]
    notes = [
        "",
        f"{meta['prompts']} held-out prompts, {meta['samples']} samples per prompt (greedy: 1); "
        f"base LM `{meta['base_model']}`, policy `{meta['policy']}`; continuations of at most "
        f"{meta['max_new_tokens']} tokens (at least {meta['min_new_tokens']}) ending with "
        f"{meta['termination']!r}.",
        f"log p = log p_base(z {meta['termination']!r} | prompt), with the termination token, "
        "max and mean over a prompt's samples, averaged over prompts (nats). \"reward\": with "
        f"the illegal-token bias ({bias}) on the base LM's logits, exactly the training "
        "reward before its temperature; \"plain LM\": without it.",
        f"Diversity: 1 - mean pairwise cosine similarity of {meta['embedder']} embeddings of a "
        "prompt's samples, averaged over prompts.",
        "Illegal tokens " + ("suppressed in every method." if meta["suppress_illegal"]
                             else "allowed in every method."),
    ]
    return "\n".join(lines + notes) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Log-likelihood (reward) against diversity, one point per method: the mean over
    prompts of the per-prompt max (left) and mean (right). A method without a diversity
    (greedy's one sample) is drawn hollow at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osDv^<>pXhd"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True)
    for ax, key, what in ((axes[0], "max_ll", "max"), (axes[1], "mean_ll", "mean")):
        for k, (name, m) in enumerate(summary.items()):
            hollow = m["diversity"] is None
            x = 0.0 if hollow else m["diversity"]
            color = f"C{k % 10}"
            ax.scatter([x], [m[key]], s=140 if name == "gfn" else 60,
                       marker="*" if name == "gfn" else markers[k % len(markers)],
                       label=m["label"], zorder=3,
                       facecolors="none" if hollow else color, edgecolors=color)
        ax.set_xlabel("diversity (1 - mean pairwise cosine similarity)")
        ax.set_ylabel(f"{what} log p(z STOP | prompt) over samples (nats)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(out: Path, summary: dict, meta: dict, per_prompt: list[dict]) -> dict:
    """Write the three files into ``out``; returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.md",
             "plot": out / "ll_vs_diversity.png"}
    paths["json"].write_text(json.dumps(
        {"meta": meta, "methods": summary, "prompts": per_prompt}, indent=1))
    paths["table"].write_text(markdown_table(summary, meta))
    plot(summary, paths["plot"],
         f"{meta['policy']} vs decoding baselines of {meta['base_model']}\n"
         f"{meta['prompts']} held-out prompts x {meta['samples']} samples")
    return paths
