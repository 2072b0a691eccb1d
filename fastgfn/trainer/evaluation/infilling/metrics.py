"""Similarity of a sampled middle to the reference middle, as the paper's evaluation computes
it: BLEU-4 and GLEU-4 of nltk on whitespace tokens (``sentence_bleu`` with smoothing method 1,
``sentence_gleu`` with n-grams of 1 to 4), and BERTScore F1 of the ``bert-score`` package with
a local model directory (no hub). Needs ``pip install 'fastgfn[eval]'`` (nltk==3.10.4,
bert-score==0.3.13).

The paper's BERTScore used microsoft/deberta-xlarge-mnli rescaled with its baseline; here the
model is a packaged sentence-transformers encoder (all-mpnet-base-v2 or all-MiniLM-L6-v2, the
continuation evaluation's embedders) without rescaling, so the BERTScore numbers are not
comparable with the paper's. BLEU and GLEU are computed as the paper's code does.
"""

from __future__ import annotations

import os


def _nltk():
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from nltk.translate.gleu_score import sentence_gleu
    except ImportError as exc:
        raise ImportError("evaluation.infilling: BLEU/GLEU need nltk (pip install 'fastgfn[eval]')"
                          ) from exc
    return sentence_bleu, sentence_gleu, SmoothingFunction().method1


def bleu4(reference: str, candidate: str) -> float:
    """Sentence BLEU-4 (uniform weights, smoothing method 1) on whitespace tokens."""
    sentence_bleu, _, smooth = _nltk()
    cand = candidate.split()
    if not cand:
        return 0.0
    return float(sentence_bleu([reference.split()], cand, smoothing_function=smooth))


def gleu4(reference: str, candidate: str) -> float:
    """Sentence GLEU with n-grams of 1 to 4 on whitespace tokens."""
    _, sentence_gleu, _ = _nltk()
    cand = candidate.split()
    if not cand:
        return 0.0
    return float(sentence_gleu([reference.split()], cand, min_len=1, max_len=4))


class BertScore:
    """BERTScore F1 from a local encoder: ``name`` is ``auto`` (all-mpnet-base-v2 when its
    packages are installed, else all-MiniLM-L6-v2), one of those two names, or a directory of
    a Hugging Face encoder; ``layer`` the hidden layer whose token embeddings are matched
    (default: the last)."""

    def __init__(self, name: str = "auto", layer: int | None = None, device: str = "cpu"):
        from pathlib import Path

        from fastgfn.trainer.evaluation.continuation.embeddings import model_dir, resolve_name

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from bert_score import BERTScorer
        except ImportError as exc:
            raise ImportError("evaluation.infilling: BERTScore needs bert-score (pip install "
                              "'fastgfn[eval]')") from exc
        self.name = resolve_name(name)
        path = model_dir(self.name)
        layers = _num_layers(path)
        self.layer = layers if layer is None else int(layer)
        if not 1 <= self.layer <= layers:
            raise ValueError(f"bertscore_layer: must be in [1, {layers}] for {self.name}, got "
                             f"{self.layer}")
        self.name = Path(self.name).name if Path(self.name).is_dir() else self.name
        self.scorer = BERTScorer(model_type=str(path), num_layers=self.layer, device=device,
                                 lang="en")

    def __call__(self, reference: str, candidates: list[str]) -> list[float]:
        """F1 of each candidate against the reference (0 for an empty candidate)."""
        keep = [i for i, c in enumerate(candidates) if c.strip()]
        out = [0.0] * len(candidates)
        if keep:
            _, _, f1 = self.scorer.score([candidates[i] for i in keep], [reference] * len(keep),
                                         verbose=False)
            for i, v in zip(keep, f1.tolist()):
                out[i] = float(v)
        return out


def _num_layers(path) -> int:
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "config.json").read_text())
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"bertscore_model: cannot tell the number of layers of {str(path)!r}")
    return n
