"""The tool interface and the calculator: the parser, the sampler's forced tool tokens, the
teacher-forced pass at the states, the loss, the replay buffer's masks."""

import json
import random
import re

import pytest
import torch

import fastgfn
from fastgfn.trainer import load_config
from fastgfn.trainer.model.loading import build_tiny
from fastgfn.trainer.replay import ReplayBuffer, check_state
from fastgfn.trainer.sampling.sampler import sample
from fastgfn.trainer.scoring import gfn_logprobs, state_positions
from fastgfn.trainer.tools import Tool, token_budget
from fastgfn.trainer.tools.calculator import (
    CalculatorTool,
    complete_rationale,
    evaluate,
    step_expression,
)

# ---- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("6 - 0", 6), (" 6 - 4 ", 2), ("2 - 8", -6), ("-6 + 3", -3), ("-4 - 3", -7), ("6-4", 2),
    ("6 -4", 2), ("6 - -4", 10), ("6+-4", 2), ("  12  +  30 ", 42), ("0 - 0", 0),
    ("999999 + 999999", 1999998), ("007 + 1", 8),
])
def test_calculator_well_formed(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "6", "-6", "6 +", "+ 6", "- 4 + 1", "6 + + 4", "6 ++ 4", "--6 + 1", "6 + 4 + 1",
    "6 * 4", "6 / 2", "a + 1", "6 + x", "6 + 4a", "6.5 + 1", "1e3 + 1", "6,+ 4", "(6) + 4",
    "1234567 + 1", "1 + 1234567", "６ + 1", "٣ + 1", "6\t+ 4", "6 + 4\n", "6 = 4", "+6 + 1",
    "6 - - 4", "0x10 + 1", "6_0 + 1",
])
def test_calculator_malformed_gives_no_result(text):
    assert evaluate(text) is None


def _oracle(text, max_operands=2, max_digits=6):
    """The grammar as a regular expression, evaluated with Python integers (test only)."""
    operand = rf"-?[0-9]{{1,{max_digits}}}"
    if not re.fullmatch(rf" *{operand}( *[+-] *{operand})* *", text):
        return None
    operands = [int(x) for x in re.findall(rf"(?:^|[+-]) *({operand})", text.strip())]
    ops = re.findall(r"[0-9] *([+-])", text)
    if not 2 <= len(operands) <= max_operands or len(ops) != len(operands) - 1:
        return None
    value = operands[0]
    for op, x in zip(ops, operands[1:]):
        value = value + x if op == "+" else value - x
    return value


def test_calculator_property_random_expressions():
    """Random well-formed expressions equal integer arithmetic; random strings over the
    expression alphabet (plus letters) agree with the grammar's regular expression and never
    raise."""
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randint(2, 4)
        xs = [rng.randint(-10**rng.randint(0, 6) + 1, 10**rng.randint(0, 6) - 1)
              for _ in range(n)]
        ops = [rng.choice("+-") for _ in range(n - 1)]
        sp = lambda: " " * rng.randint(0, 2)  # noqa: E731
        text = sp() + str(xs[0]) + "".join(sp() + o + sp() + str(x)
                                            for o, x in zip(ops, xs[1:])) + sp()
        want = xs[0]
        for o, x in zip(ops, xs[1:]):
            want = want + x if o == "+" else want - x
        assert evaluate(text, max_operands=4) == want, text
        assert evaluate(text, max_operands=n - 1) is None  # too many operands
    alphabet = "0123456789 +--=a,"
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert evaluate(text, max_operands=3) == _oracle(text, 3), text


def test_step_expression_and_complete_rationale():
    assert step_expression(" 6 - 0 =") == " 6 - 0 "
    assert step_expression(" 6 - 0 = 6, 6 - 4 =") == " 6 - 4 "
    assert step_expression(" 4 + 5 = 9 - 3 =") == " 9 - 3 "
    assert step_expression(" 6 - 0") is None
    assert complete_rationale("6 - 0 =, 6 - 4 =, 2 - 8 =") == "6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"
    assert complete_rationale("5 - 9 =, -4 - 3 =") == "5 - 9 = -4, -4 - 3 = -7"
    assert complete_rationale("6 =, a + 1 =") == "6 =, a + 1 ="  # no result, no insertion


# ---- the tool as the sampler calls it -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, ["model=tiny", "tiny_hidden=32"])
    model, tok = build_tiny(cfg, seed=3)
    return model.eval(), tok


def test_calculator_tool_tokens(tiny):
    _, tok = tiny
    calc = CalculatorTool(tok)
    assert calc.trigger_ids == {tok.encode("=")[0]}
    assert calc.call(tok.encode(" 6 - 8 =")) == tok.encode(" -2")
    assert calc.call(tok.encode(" 6 - 8 = -2, -2 + 10 =")) == tok.encode(" 8")
    for bad in (" 6 =", " 6 + =", "=", " x - 1 =", " 6 - 8", ""):
        assert calc.call(tok.encode(bad)) == []
    assert token_budget(5, calc) == 5 * (1 + calc.max_result_tokens)
    assert token_budget(5, None) == 5


class _Broken(Tool):
    name = "broken"

    def __init__(self, triggers, result):
        self.trigger_ids, self.max_result_tokens, self.result = frozenset(triggers), 3, result

    def result_tokens(self, context):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_tool_failures_never_reach_the_sampler(tiny):
    """A tool that raises, returns too much or returns garbage is "no result": the rollout
    completes with every token an action."""
    model, tok = tiny
    eq = tok.encode("=")[0]
    bias = torch.zeros(len(tok))
    bias[eq] = 6.0  # "=" nearly every step
    for result in (ZeroDivisionError("boom"), [1, 2, 3, 4], ["x"], [-1], None, [True]):
        tool = _Broken([eq], result)
        with pytest.warns(RuntimeWarning) if isinstance(result, Exception) else _nothing():
            r = sample(model, torch.tensor(tok.encode("q: ")), 4, max_new_tokens=5,
                       termination_token_id=tok.encode(".")[0], vocab_bias=bias,
                       generator=torch.Generator().manual_seed(0), tool=tool)
        assert (r.num_actions == r.lengths).all() and bool(r.action_mask.all())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _arith_bias(tok, rows, scale, seed):
    """Per-row random biases over the calculator's alphabet (everything else forbidden)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.full((rows, len(tok)), float("-inf"))
    allowed = tok.encode("0123456789+- =,.")
    bias[:, allowed] = scale * torch.randn(rows, len(allowed), generator=g)
    return bias


def _grammar(tok, seed=0):
    """``[V, V, V]`` logit bias given the last two tokens: a second-order chain over the
    rationale alphabet that mostly writes "a op b =" steps separated by "," (a random tiny
    model never would)."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    classes = {"digit": tok.encode("0123456789"), "op": tok.encode("+-"),
               "=": tok.encode("="), ",": tok.encode(","), " ": tok.encode(" "),
               ".": tok.encode(".")}
    other = [i for i in range(V) if not any(i in c for c in classes.values())]
    classes["other"] = other  # the prompt's characters
    def weights(a, b):  # next-class log-weights after classes a, b (b the last)
        if b == "digit":
            return {"=": 3.0} if a == "op" else {"op": 3.0, "=": 0.5, ",": 2.0, ".": 2.0}
        return {"op": {"digit": 3.0}, "=": {",": 3.0, ".": 0.5}, ",": {"digit": 3.0},
                " ": {"digit": 3.0, "op": 0.5}}.get(b, {"digit": 3.0})

    table = torch.full((V, V, V), -30.0)
    for a, ids_a in classes.items():
        for b, ids_b in classes.items():
            for cls, w in weights(a, b).items():
                for i in ids_a:
                    for j in ids_b:
                        table[i, j, classes[cls]] = 3 * w + 0.5 * torch.randn(
                            len(classes[cls]), generator=g)
    return table


class _GrammarDecoder:
    """A ``Decoder`` over the tiny model (its real KV-cache decoding) whose logits get the
    grammar's bias for each row's last two tokens."""

    def __init__(self, model, table):
        self.model, self.table = model, table

    def decoding(self, prompt_ids, batch_size, max_new_tokens):
        import contextlib

        from fastgfn.trainer.sampling.decoding import TransformersDecoder

        @contextlib.contextmanager
        def ctx():
            with TransformersDecoder(self.model).decoding(prompt_ids, batch_size,
                                                          max_new_tokens) as d:
                yield _GrammarDecoding(d, self.table, prompt_ids[-2:].tolist(), batch_size)
        return ctx()


class _GrammarDecoding:
    def __init__(self, d, table, last_two, batch_size):
        self.d, self.table = d, table
        self.prev = torch.full((batch_size,), last_two[0], dtype=torch.long)
        self.last = torch.full((batch_size,), last_two[1], dtype=torch.long)
        self.first_logits = d.first_logits.float() + table[self.prev, self.last]

    def keep_rows(self, index):
        self.d.keep_rows(index)
        self.prev, self.last = self.prev[index], self.last[index]

    def step(self, tokens):
        self.prev, self.last = self.last, tokens
        return self.d.step(tokens).float() + self.table[self.prev, self.last]


def _check_insertions(tok, calc, row, mask):
    """Every trigger action is followed by exactly the calculator's result (marked as tool
    tokens), and nothing else is a tool token. Returns how many results were inserted."""
    j, inserted = 0, 0
    while j < len(row):
        assert mask[j], (tok.decode(row), j)
        if row[j] in calc.trigger_ids:
            want = calc.call(row[: j + 1])
            got = row[j + 1 : j + 1 + len(want)]
            assert got == want and not any(mask[j + 1 : j + 1 + len(want)]), tok.decode(row)
            inserted += bool(want)
            j += len(want)
        j += 1
    return inserted


def test_sampled_rows_carry_exactly_the_tool_results(tiny):
    model, tok = tiny
    calc = CalculatorTool(tok)
    term = tok.encode(".")[0]
    B = 48
    r = sample(_GrammarDecoder(model, _grammar(tok)), torch.tensor(tok.encode("Q: 1+2=? A:")),
               B, max_new_tokens=12, min_new_tokens=3, termination_token_id=term,
               vocab_bias=_arith_bias(tok, B, 0.5, 1), temperatures=1.0,
               generator=torch.Generator().manual_seed(2), tool=calc)
    inserted = sum(_check_insertions(tok, calc, row, m) for row, m in zip(r.rows(), r.masks()))
    assert inserted >= 8
    assert (r.num_actions <= 12).all() and (r.num_actions >= 3).all()
    # a row that used all its actions without stopping is not terminated
    assert not r.terminated[r.num_actions == 12].any()
    assert r.tokens.shape[1] == int(r.lengths.max())


def _reference_greedy(model, table, prompt, bias, calc, term, max_actions):
    """One row at a time, a full forward pass over the whole sequence at every step, the
    tool's result appended at once after a trigger."""
    row, mask = [], []
    while sum(mask) < max_actions:
        ids = torch.tensor([prompt + row])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        logits = logits + table[ids[0, -2], ids[0, -1]] + bias
        nxt = int(logits.argmax())
        if nxt == term:
            return row, mask, True
        row.append(nxt)
        mask.append(True)
        if nxt in calc.trigger_ids:
            result = calc.call(row)
            row += result
            mask += [False] * len(result)
    return row, mask, False


def test_sampler_with_tool_matches_one_row_reference(tiny):
    """Greedy rows with different biases (so they differ and finish at different steps),
    batched with the shared prompt cache and finished rows dropped, equal a row-by-row
    reference with full forward passes."""
    model, tok = tiny
    calc = CalculatorTool(tok)
    term = tok.encode(".")[0]
    prompt = tok.encode("Q: 7-9=? A:")
    B = 16
    bias = _arith_bias(tok, B, 1.5, 7)
    table = _grammar(tok, 1)
    r = sample(_GrammarDecoder(model, table), torch.tensor(prompt), B, max_new_tokens=10,
               termination_token_id=term, temperatures=0.0, vocab_bias=bias, tool=calc)
    inserted = 0
    for b, (row, m) in enumerate(zip(r.rows(), r.masks())):
        ref_row, ref_mask, ref_term = _reference_greedy(model, table, prompt, bias[b], calc,
                                                        term, 10)
        assert row == ref_row and m == ref_mask, (tok.decode(row), tok.decode(ref_row))
        assert bool(r.terminated[b]) == ref_term
        inserted += m.count(False) > 0
    assert inserted >= 3 and len({tuple(x) for x in r.rows()}) > 8


# ---- the teacher-forced pass at the states ------------------------------------------------


def test_state_positions():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).bool()
    lengths = torch.tensor([6, 3, 0])
    states, n = state_positions(mask, lengths)
    assert n.tolist() == [3, 2, 0]
    assert states.tolist() == [[0, 1, 4, 6], [0, 2, 3, 3], [0, 0, 0, 0]]


def _tool_rows(tiny, B=12, seed=4):
    model, tok = tiny
    calc = CalculatorTool(tok)
    term = tok.encode(".")[0]
    prompt = torch.tensor(tok.encode("Q: 3+4=? A:"))
    r = sample(_GrammarDecoder(model, _grammar(tok, seed)), prompt, B, max_new_tokens=9,
               min_new_tokens=1, termination_token_id=term,
               vocab_bias=_arith_bias(tok, B, 0.5, seed), temperatures=1.0,
               generator=torch.Generator().manual_seed(seed), tool=calc)
    assert (~r.action_mask).any()
    return prompt, r, term


def test_state_logprobs_equal_float64_brute_force(tiny):
    """log_pf at actions only and log_pterm at every state s_t (after t actions and their
    tool results) equal a float64 full forward pass over prompt + tokens."""
    model, tok = tiny
    prompt, r, term = _tool_rows(tiny)
    states, n = state_positions(r.action_mask, r.lengths)
    with torch.no_grad():
        log_pf, log_pterm = gfn_logprobs(model, prompt, r.tokens, term, use_fused=True,
                                         states=states)
    m64 = _double(model)
    P = prompt.numel()
    for b, row in enumerate(r.rows()):
        ids = torch.tensor([prompt.tolist() + row])
        with torch.no_grad():
            logp = torch.log_softmax(m64(input_ids=ids).logits[0].double(), -1)
        actions = [j for j, a in enumerate(r.masks()[b]) if a]
        assert len(actions) == int(n[b])
        for t, j in enumerate(actions):  # the state before action t is after j tokens
            assert abs(float(log_pf[b, t]) - float(logp[P - 1 + j, row[j]])) < 1e-4
            assert abs(float(log_pterm[b, t]) - float(logp[P - 1 + j, term])) < 1e-4
        assert abs(float(log_pterm[b, len(actions)]) - float(logp[P - 1 + len(row), term])) < 1e-4


def _double(model):
    import copy

    return copy.deepcopy(model).double().eval()


def test_loss_ignores_inserted_tokens(tiny):
    """The loss has exactly zero gradient at the final hidden states that predict tool tokens
    (it would not if their log_pf entered it), and a nonzero one at the states."""
    model, tok = tiny
    prompt, r, term = _tool_rows(tiny, seed=5)
    states, n = state_positions(r.action_mask, r.lengths)
    captured = []
    handle = model.model.norm.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        log_pf, log_pterm = gfn_logprobs(model, prompt, r.tokens, term, use_fused=False,
                                         states=states)
    finally:
        handle.remove()
    hidden = captured[-1]  # the generated tokens' pass: [B, W, H], position j = after j+1 tokens
    hidden.retain_grad()
    log_r = torch.randn(log_pterm.shape, generator=torch.Generator().manual_seed(0))
    fastgfn.subtb_loss(log_pf, log_pterm, log_r, n, lam=0.9).backward()
    g = hidden.grad.abs().sum(-1)  # [B, W]
    for b, m in enumerate(r.masks()):
        state_set = set(states[b, : int(n[b]) + 1].tolist())
        for j in range(1, len(m) + 1):  # hidden[:, j - 1] is the state after j tokens
            if j in state_set:
                continue
            assert float(g[b, j - 1]) == 0.0, (b, j)
        assert any(float(g[b, j - 1]) > 0 for j in state_set if j >= 1) or n[b] == 0
    model.zero_grad()


def test_loss_would_see_a_leak(tiny):
    """Sanity of the test above: treating tool tokens as actions changes the loss."""
    model, _ = tiny
    prompt, r, term = _tool_rows(tiny, seed=5)
    states, n = state_positions(r.action_mask, r.lengths)
    with torch.no_grad():
        pf, pt = gfn_logprobs(model, prompt, r.tokens, term, states=states)
        pf_all, pt_all = gfn_logprobs(model, prompt, r.tokens, term)
    assert pf.shape[1] < pf_all.shape[1]
    zero = torch.zeros(pt.shape)
    a = fastgfn.subtb_loss(pf, pt, zero, n)
    b = fastgfn.subtb_loss(pf_all, pt_all, torch.zeros(pt_all.shape), r.lengths)
    assert abs(float(a) - float(b)) > 1e-3


# ---- the replay buffer ------------------------------------------------------------------


def test_replay_buffer_keeps_masks_through_json():
    buf = ReplayBuffer(3)
    buf.add(0, [5, 6, 7, 8], -1.0, [True, False, False, True])
    buf.add(0, [5, 6], -2.0)
    buf.add(1, [9, 9, 9], -0.5, [True, True, True])  # all actions: stored without a mask
    state = json.loads(json.dumps(buf.state_dict()))
    assert state["entries"]["0"][0] == [-1.0, [5, 6, 7, 8], [1, 0, 0, 1]]
    assert state["entries"]["0"][1] == [-2.0, [5, 6]]
    assert state["entries"]["1"][0] == [-0.5, [9, 9, 9]]
    other = ReplayBuffer(1)
    other.load_state_dict(state, vocab_size=10, num_prompts=2)
    assert other.entries == buf.entries and other.masks == buf.masks
    rows, masks = other.sample_with_masks(0, 20, random.Random(0))
    assert rows == other.sample(0, 20, random.Random(0))
    for row, m in zip(rows, masks):
        assert m == ([True, False, False, True] if row == [5, 6, 7, 8] else [True, True])
    # an evicted sequence takes its mask with it
    for x in range(3):
        buf.add(0, [x], 5.0 + x)
    assert buf.mask(0, [5, 6, 7, 8]) is None and [5, 6, 7, 8] not in [s for _, s in
                                                                     buf.entries[0]]
    assert buf.masks[0] == {}


@pytest.mark.parametrize("mask", [[1, 0], [1, 2, 0, 1], "1001", [1, 0, 0, True]])
def test_replay_state_rejects_bad_masks(mask):
    state = {"capacity": 2, "min_distance": 0, "entries": {"0": [[-1.0, [5, 6, 7, 8], mask]]}}
    with pytest.raises(ValueError, match=r"buffer.entries\['0'\]\[0\]: the action mask"):
        check_state(state)
    with pytest.raises(ValueError, match="action_mask"):
        ReplayBuffer(2).add(0, [1, 2], 0.0, [True])
