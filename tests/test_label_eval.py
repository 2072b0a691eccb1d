"""The label-task evaluation (``fastgfn.trainer.evaluation.reasoning``): choice scores
against a float64 brute force (values and gradients, with and without a shared prefix,
irregular lengths, multi-token choices), classifier training that must learn a rule, the
majority vote, and the command end to end on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastgfn.trainer.evaluation.reasoning.classifier import choice_scores, predict, train_classifier
from fastgfn.trainer.evaluation.reasoning.cli import main, parse_args, vote

from .test_continuation import _tiny_lm


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm(sharpen=4.0)


def brute_force_scores(model, contexts, choices, prefix=()):
    """float64: one full forward pass per ``prefix context Y_c``, no cache, no fused op."""
    m = copy.deepcopy(model).double()
    out = torch.zeros(len(contexts), len(choices), dtype=torch.float64)
    for i, ctx in enumerate(contexts):
        for c, y in enumerate(choices):
            seq = list(prefix) + list(ctx) + list(y)
            logp = torch.log_softmax(m(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            start = len(prefix) + len(ctx)
            out[i, c] = sum(logp[start - 1 + k, y[k]] for k in range(len(y)))
    return out


CONTEXTS = [[5, 9, 2], [7], [3, 3, 8, 1, 4, 6], [11, 2]]
CHOICES = [[4], [12, 6], [9, 9, 9]]


@pytest.mark.parametrize("prefix", [None, [1, 2, 3, 4, 5]])
def test_choice_scores_match_brute_force(lm, prefix):
    model, _ = lm
    with torch.no_grad():
        got = choice_scores(model, CONTEXTS, CHOICES, prefix=prefix, pad_token_id=0)
    want = brute_force_scores(model, CONTEXTS, CHOICES, prefix or ())
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
    # batching changes nothing
    batched = predict(model, CONTEXTS, CHOICES, prefix=prefix, batch_size=3)
    torch.testing.assert_close(batched, got, atol=1e-5, rtol=1e-5)


def test_choice_scores_gradient_matches_brute_force(lm):
    model, _ = lm
    model = copy.deepcopy(model).requires_grad_(True)
    w = torch.randn(len(CONTEXTS), len(CHOICES), generator=torch.Generator().manual_seed(0))
    (choice_scores(model, CONTEXTS, CHOICES) * w).sum().backward()
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    want = torch.zeros(len(CONTEXTS), len(CHOICES), dtype=torch.float64)
    for i, ctx in enumerate(CONTEXTS):
        for c, y in enumerate(CHOICES):
            seq = ctx + y
            logp = torch.log_softmax(ref(input_ids=torch.tensor([seq])).logits[0], -1)
            want[i, c] = sum(logp[len(ctx) - 1 + k, y[k]] for k in range(len(y)))
    (want * w.double()).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_choice_scores_bad_arguments(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="contexts"):
        choice_scores(model, [], CHOICES)
    with pytest.raises(ValueError, match="empty context"):
        choice_scores(model, [[]], CHOICES)
    with pytest.raises(ValueError, match="choice_ids"):
        choice_scores(model, CONTEXTS, [[1], []])


def test_train_classifier_learns_a_rule(lm):
    """The label is which of two marker tokens ends the context; the other tokens are noise.
    Before training the classifier is at chance on held-out contexts, after it is right on
    all of them."""
    model = copy.deepcopy(lm[0])
    gen = torch.Generator().manual_seed(1)

    def contexts(n):
        rows, labels = [], []
        for _ in range(n):
            noise = torch.randint(20, 60, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                  generator=gen).tolist()
            y = int(torch.randint(2, (1,), generator=gen))
            rows.append(noise + [(13, 17)[y]])
            labels.append(y)
        return rows, labels

    train, train_y = contexts(32)
    test, test_y = contexts(32)
    choices = [[4], [12]]
    before = (predict(model, test, choices).argmax(1) == torch.tensor(test_y)).float().mean()
    losses = train_classifier(model, train, train_y, choices, steps=40, batch_size=8, lr=3e-3,
                              generator=gen)
    after = (predict(model, test, choices).argmax(1) == torch.tensor(test_y)).float().mean()
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert after == 1.0 and before < 0.9
    assert not any(p.requires_grad for p in model.parameters())  # frozen again
    with pytest.raises(ValueError, match="labels"):
        train_classifier(model, train, train_y[:-1], choices, steps=1, batch_size=2, lr=1e-3,
                         generator=gen)
    with pytest.raises(ValueError, match="not a choice index"):
        train_classifier(model, train, [2] * len(train), choices, steps=1, batch_size=2,
                         lr=1e-3, generator=gen)


def test_vote_counts_per_question_ties_to_the_first_choice():
    # question 0: votes 0, 1, 1 -> 1; question 1: 0, 1 tie at k=2 -> 0 (first), here k=3: 2, 2, 0
    scores = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0],
                           [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    assert vote(scores, 3, 3).tolist() == [1, 2]
    tie = torch.tensor([[1.0, 0], [0, 1]])
    assert vote(tie, 2, 2).tolist() == [0]


def test_command_end_to_end(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                             (("ab cd", "yes"), ("ef", "no"), ("gh ij", "yes"), ("kl", "no"))))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                            (("mn", "no"), ("op qr", "yes"), ("st", "yes"))))
    out = tmp_path / "eval"
    main(["--config", "configs/tiny_smoke.yaml", "--train", str(train), "--test", str(test),
          "--policy", "gfn=tiny", "--k", "3", "--m_rationales", "2", "--classifier_steps", "2",
          "--classifier_batch", "2", "--out", str(out), "task=reasoning", "question_key=q",
          "answer_key=a", "termination=.", "max_new_tokens=3", "min_new_tokens=1",
          "tiny_hidden=32", "tiny_layers=1", f"data_path={train}"])
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["choices"] == ["no", "yes"]
    assert report["settings"]["test_examples"] == 3 and "machine" in report["settings"]
    labels = list(report["results"])
    assert labels[0] == "zero-shot (base LM)" and labels[2] == "SFT (X -> Y)"
    assert labels[1].startswith("few-shot (base LM, 4 examples)")
    assert any(x.startswith("gfn + M-step") for x in labels)
    for label, r in report["results"].items():
        assert r["greedy_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0), label
        assert len(r["predictions"]) == 3
        assert report["accuracy"][label]["greedy"] == round(100 * r["greedy_accuracy"], 2)
    m = report["results"][next(x for x in labels if "M-step" in x)]
    assert m["m_contexts"] == 8 and len(m["classifier_losses"]) == 2
    assert m["majority_accuracy"] is not None
    assert (out / "tables.md").read_text().startswith("### 4 training examples, 3 test")


def test_bad_arguments():
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--k", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--methods", "zero-shot,oracle"])
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--policy", "nolabel"])
