"""The random-number task's reward, dead ends and metrics (character-level tokenizer)."""

import math

import pytest

from fastgfn.trainer.model.loading import CharTokenizer
from fastgfn.trainer.tasks.random_number import RandomNumberTask


@pytest.fixture
def task():
    return RandomNumberTask(CharTokenizer(), termination=",", invalid_log_reward=-7.0)


def _ids(tok, s):
    return tok.encode(s)


def test_prefix_rewards(task):
    tok = task.tokenizer
    rows = [_ids(tok, "42"), _ids(tok, "100"), _ids(tok, "007"), _ids(tok, "4a"), _ids(tok, "101")]
    r = task.log_rewards(0, rows, 3)
    assert r.shape == (5, 4)
    assert r[0].tolist() == [-7.0, 0.0, 0.0, -7.0]  # "", "4", "42", (padding)
    assert r[1].tolist() == [-7.0, 0.0, 0.0, 0.0]
    assert r[2].tolist() == [-7.0, 0.0, -7.0, -7.0]  # "0" valid, "00" not canonical
    assert r[3].tolist() == [-7.0, 0.0, -7.0, -7.0]
    assert r[4].tolist() == [-7.0, 0.0, 0.0, -7.0]  # 101 is out of range


def test_dead_index(task):
    tok = task.tokenizer
    assert task.dead_index(_ids(tok, "42")) is None
    assert task.dead_index(_ids(tok, "4a7")) == 2
    assert task.dead_index(_ids(tok, "101")) == 3
    assert task.dead_index(_ids(tok, " 5")) == 1
    assert task.dead_index([]) is None


def test_allowed_tokens(task):
    tok = task.tokenizer
    assert sorted(task.allowed_token_ids()) == sorted(_ids(tok, "0123456789,"))


def test_evaluate_metrics(task):
    texts = [str(v) for v in range(101)] * 2 + ["x", "05"]
    terms = [True] * 202 + [True, True]
    m = task.evaluate(texts, terms)
    assert m["valid_fraction"] == pytest.approx(202 / 204)
    assert m["distinct_values"] == 101 and m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    m = task.evaluate(["1", "1", "2", "3"], [True, True, True, False])
    p = {1: 2 / 3, 2: 1 / 3}
    assert m["kl_uniform"] == pytest.approx(sum(q * math.log(q * 101) for q in p.values()))
    assert m["valid_fraction"] == 0.75


def test_termination_must_be_one_token():
    with pytest.raises(ValueError, match="termination"):
        RandomNumberTask(CharTokenizer(), termination=", ")
