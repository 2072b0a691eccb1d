"""The latent-reasoning task: its prefix rewards (rationale likelihood + answer likelihood)
against a float64 brute force, its data loading and argument checks, and that GFlowNet
training on it learns the posterior over rationales (tiny random model)."""

import copy
import json
from pathlib import Path

import pytest
import torch

import fastgfn
from fastgfn.trainer import ConfigError, load_config
from fastgfn.trainer.tasks.data import load_examples
from fastgfn.trainer.tasks.reasoning import LatentReasoningTask

from .test_continuation import _exact_distributions, _kl, _tiny_lm, brute_force_log_reward

DATA = Path(__file__).resolve().parents[1] / "fastgfn" / "data" / "gfn-lm-tuning"  # shipped


def brute_force_answer(model, prompt, rationale, term, answer):
    """log p(answer | prompt rationale STOP) in float64: one full forward pass, no cache, no
    fused op, no vocabulary bias."""
    m = copy.deepcopy(model).double()
    head = list(prompt) + list(rationale) + [term]
    seq = torch.tensor([head + list(answer)])
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=seq).logits[0].double(), dim=-1)
    return sum(float(logp[len(head) - 1 + k, answer[k]]) for k in range(len(answer)))


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm(sharpen=8.0)


def _task(lm, **kw):
    model, tok = lm
    return LatentReasoningTask(
        tok, ["2+3", "is it?"], ["5", "yes"], model, prompt_template="Q: {question} R:",
        answer_template=" A: {answer}", termination=".", **kw
    )


def test_prefix_rewards_match_brute_force(lm):
    model, tok = lm
    task = _task(lm)
    enc, term = tok.encode, task.termination_token_id
    T = 4
    rows = [enc("abcd"), [], enc("x"), enc("a\nb"), enc(" Q!")]
    bias = task.vocab_bias()
    for p in (0, 1):
        prompt = enc(task.prompts[p])
        answer = enc(task.answer_texts[p])
        assert task.answer_tokens(p).tolist() == answer and len(answer) > 1
        got = task.log_rewards(p, rows, T)
        ans = task.answer_log_likelihood(p, rows, T)
        assert got.shape == ans.shape == (len(rows), T + 1) and got.dtype == torch.float32
        for b, row in enumerate(rows):
            for t in range(len(row) + 1):
                a = brute_force_answer(model, prompt, row[:t], term, answer)
                z = brute_force_log_reward(model, prompt, row[:t], term, bias)
                assert ans[b, t].item() == pytest.approx(a, abs=2e-4), (p, b, t)
                assert got[b, t].item() == pytest.approx(z + a, abs=4e-4), (p, b, t)
            assert (ans[b, len(row) + 1 :] == 0).all()  # past the row: 0, masked by the loss
    # the two questions have different answers: the answer term depends on the question
    assert not torch.allclose(task.answer_log_likelihood(0, rows, T),
                              task.answer_log_likelihood(1, rows, T))
    # with the answer in the prompt's place the answer term is not a constant over prefixes
    assert task.answer_log_likelihood(0, rows, T)[0, :5].std() > 0.1
    torch.testing.assert_close(task.log_rewards(0, rows, T), task.log_rewards(0, rows, T))


def test_wrong_answer_penalty_matches_brute_force(lm):
    """The paper's SUBJ reward: ``log R`` minus the penalty at every prefix after which the
    reward LM finds another choice strictly likelier than the answer (float64 brute force of
    every choice's answer term); the same prefixes unpenalised otherwise."""
    model, tok = lm
    kw = dict(prompt_template="Q: {question} R:", answer_template=" A: {answer}",
              termination=".")
    questions, answers = ["2+3", "is it?", "ok"], ["5", "yes", "no"]
    plain = LatentReasoningTask(tok, questions, answers, model, **kw)
    task = LatentReasoningTask(tok, questions, answers, model, wrong_answer_log_penalty=50.0,
                               **kw)
    enc, term = tok.encode, task.termination_token_id
    rows, T = [enc("abcd"), [], enc("x y")], 4
    penalised = 0
    for p in range(3):
        prompt = enc(task.prompts[p])
        got, base = task.log_rewards(p, rows, T), plain.log_rewards(p, rows, T)
        for b, row in enumerate(rows):
            for t in range(len(row) + 1):
                ll = {c: brute_force_answer(model, prompt, row[:t], term, enc(f" A: {c}"))
                      for c in task.choices}
                wrong = max(v for c, v in ll.items() if c != answers[p]) > ll[answers[p]]
                penalised += wrong
                assert got[b, t].item() == pytest.approx(base[b, t].item() - 50.0 * wrong,
                                                         abs=1e-3), (p, b, t)
    assert 0 < penalised < 3 * sum(len(r) + 1 for r in rows)  # both cases occur
    # the answer term alone (answer_log_likelihood) carries no penalty
    torch.testing.assert_close(task.answer_log_likelihood(0, rows, T),
                               plain.answer_log_likelihood(0, rows, T))
    with pytest.raises(ValueError, match="wrong_answer_log_penalty"):
        LatentReasoningTask(tok, questions, answers, model, wrong_answer_log_penalty=-1.0, **kw)


def test_unfused_path_matches(lm):
    task, plain = _task(lm), _task(lm, use_fused=False)
    rows = [[5, 6, 7], [8]]
    torch.testing.assert_close(task.log_rewards(0, rows, 3), plain.log_rewards(0, rows, 3),
                               atol=1e-4, rtol=0)


def test_load_examples_and_bad_arguments(lm, tmp_path):
    model, tok = lm
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"q": "1+1", "a": 2}, {"q": "2+2", "a": 4}]))
    assert load_examples(js, "q", "a") == (["1+1", "2+2"], ["2", "4"])
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"q": "x", "a": "y"}\n\n{"q": "z", "a": "w"}\n')
    assert load_examples(jl, "q", "a") == (["x", "z"], ["y", "w"])
    with pytest.raises(ValueError, match="answer_key: field 'b' is missing from item 0"):
        load_examples(jl, "q", "b")
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_examples(tmp_path / "none.json", "q", "a")
    (tmp_path / "bad.json").write_text('{"q": 1}')
    with pytest.raises(ValueError, match="data_path: .* list of objects"):
        load_examples(tmp_path / "bad.json", "q", "a")
    with pytest.raises(ValueError, match="prompt_template"):
        LatentReasoningTask(tok, ["x"], ["y"], model, prompt_template="no slot")
    with pytest.raises(ValueError, match="answer_template"):
        LatentReasoningTask(tok, ["x"], ["y"], model, answer_template="no slot")
    with pytest.raises(ValueError, match="answers: need one per question"):
        LatentReasoningTask(tok, ["x", "z"], ["y"], model)
    task = _task(lm)
    with pytest.raises(ValueError, match="prompt_index"):
        task.answer_log_likelihood(2, [[5]], 1)
    with pytest.raises(ValueError, match="T: must be >="):
        task.answer_log_likelihood(0, [[5, 6]], 1)
    for bad, key in ((["prompt_template=Q"], "prompt_template"),
                     (["answer_template=A"], "answer_template"), ([], "data_path")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["task=reasoning", *([f"data_path={js}"] if bad else []), *bad])


def test_paper_data_files_load():
    q, a = load_examples(DATA / "subj" / "train.10.jsonl", "text", "label_text")
    assert len(q) == len(a) == 10 and set(a) <= {"objective", "subjective"}
    q, a = load_examples(DATA / "arithmetic_with_tool" / "1digit_34_op+-_train_50.json",
                         "str_query", "num_sol")
    assert len(q) == 50 and all(x.lstrip("-").isdigit() for x in a)


def test_training_learns_the_posterior(tmp_path):
    """SubTB training on the reasoning task moves the policy to the tempered posterior over
    rationales R(z)^(1/T), R(z) = p(z STOP | X) p(Y | X z STOP): the exact KL between target
    and policy over all 1-2 token rationales (both directions) drops by more than half, the
    policy ends nearer this target than the continuation task's target (the rationale term
    alone) is, so the answer term is learned, and the answer's mean log-likelihood after the
    policy's own rationales rises. The LM is peaked (final norm x16) so that the answer term
    moves the target: KL(posterior || continuation target) 2.9; with x8 it was 0.09 and no
    policy could tell the two apart. 600 steps with a cosine decay: at 200 steps of a constant
    lr the KL after training is one point of a noisy trajectory that float rounding alone (the
    lean layers, whose gradients agree with transformers' to 1e-7) moved from 0.59 to 2.04;
    with the decay both land at 0.01. Measured (seed 1, 2 cores of a Zen 5 EPYC, about 20 s):
    KL 6.24 -> 0.012 and 1.84 -> 0.004 (0.010 and 0.004 with transformers' layers),
    KL(continuation target || policy) 0.81 after training, answer log-likelihood -36.6 ->
    -34.7."""
    from fastgfn.trainer import Trainer
    from fastgfn.trainer.sampling.sampler import sample
    from fastgfn.trainer.tasks.continuation import ContinuationTask

    torch.manual_seed(0)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "ab", "answer": "cd"}) + "\n")
    T = 0.5
    cfg = load_config(None, [
        "model=tiny", "tiny_hidden=32", "tiny_layers=2", "task=reasoning",
        f"data_path={data}", "termination=.", "batch_size=32", "max_new_tokens=2",
        "min_new_tokens=1", "steps=600", "lr=3e-3", "answer_template=so{answer}",
        f"reward_temperature={T}", "log_z_auto_init=true",
        "warmup_steps=0", "lr_schedule=cosine", "log_z_lr=0.05", "replay_prob=0.25",
        "explore_prob=0.25", "explore_vocab_prob=0", "progress=false", "tensorboard=false",
        "eval_samples=0", "sample_dtype=model", "seed=1", f"output_dir={tmp_path / 'o'}",
    ])
    tr = Trainer(cfg)
    policy, task = tr.engine.module, tr.task
    assert isinstance(task, LatentReasoningTask)
    with torch.no_grad():  # the same peaked LM for the frozen reward and the initial policy
        for m in (policy, task.reward_model):
            m.model.norm.weight.mul_(16.0)
    # the continuation task's target on the same prompt: the rationale term alone
    no_answer = copy.copy(task)
    no_answer.log_rewards = lambda *a: ContinuationTask.log_rewards(task, *a)

    def measure():
        logq, logt = _exact_distributions(policy, task, T)
        _, logc = _exact_distributions(policy, no_answer, T)
        r = sample(policy.eval(), task.prompt_tokens(0), 512, max_new_tokens=2,
                   min_new_tokens=1, termination_token_id=task.termination_token_id,
                   logit_bias=task.policy_logit_bias(),
                   generator=torch.Generator().manual_seed(123))
        ans = task.answer_log_likelihood(0, r.rows(), r.tokens.shape[1])
        answer = float(ans.gather(1, r.lengths[:, None]).mean())
        return _kl(logt, logq), _kl(logq, logt), _kl(logc, logq), answer

    _, logt = _exact_distributions(policy, task, T)
    _, logc = _exact_distributions(policy, no_answer, T)
    kl_targets = _kl(logt, logc)  # how far the answer term moves the target
    kl0, rkl0, _, a0 = measure()
    policy.train()
    tr.run()
    kl1, rkl1, klc, a1 = measure()
    print(f"KL(target||policy) {kl0:.3f} -> {kl1:.3f}; KL(policy||target) {rkl0:.3f} -> "
          f"{rkl1:.3f}; KL(target||continuation target) {kl_targets:.3f}; "
          f"KL(continuation target||policy) {klc:.3f}; answer log-likelihood "
          f"{a0:.2f} -> {a1:.2f}")
    assert kl_targets > 1.0  # the answer term matters in this problem
    assert kl0 > 0.5 and rkl0 > 1.0  # the untrained policy (= the reward LM) is far off
    assert kl1 < 0.5 * kl0 and rkl1 < 0.5 * rkl0
    assert kl1 < 0.5 * kl_targets  # nearer the posterior than the answer-blind target is
    assert a1 > a0


def test_log_z_auto_init_is_the_mean_tb_residual(tmp_path, monkeypatch):
    """log_z_auto_init: after the first step (log_z_lr=0: no Adam step moves it) log Z is
    the first batch's mean of log R(z)/T - log q(z), recomputed here from the loss inputs."""
    from fastgfn.trainer import Trainer

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "ab", "answer": "cd"}) + "\n")
    cfg = load_config(None, [
        "model=tiny", "tiny_hidden=32", "tiny_layers=1", "task=reasoning",
        f"data_path={data}", "termination=.", "batch_size=8", "max_new_tokens=3",
        "min_new_tokens=1", "steps=2", "log_z_auto_init=true", "log_z_init=5",
        "log_z_lr=0", "reward_temperature=0.5", "replay_prob=0", "progress=false",
        "tensorboard=false", "eval_samples=0", "sample_dtype=model",
        f"output_dir={tmp_path / 'o'}",
    ])
    tr = Trainer(cfg)
    seen, subtb_loss = [], fastgfn.subtb_loss

    def spy(log_pf, log_pterm, log_r, lengths, **kw):  # what the loss kernel receives
        seen.append((log_pf.detach().double(), log_pterm.detach().double(),
                     log_r.detach().double(), lengths.clone(),
                     tr.objective.log_z.value()))
        return subtb_loss(log_pf, log_pterm, log_r, lengths, **kw)

    monkeypatch.setattr(fastgfn, "subtb_loss", spy)
    tr.run()
    log_pf, log_pterm, log_r, lengths, log_z = seen[0]
    want = torch.stack([
        log_r[b, n] - log_pf[b, :n].sum() - log_pterm[b, n]
        for b, n in enumerate(lengths.tolist())
    ]).mean()
    assert lengths.min() >= 1 and abs(want) > 5  # far from log_z_init: the reset is visible
    assert log_z == pytest.approx(float(want), abs=1e-4)
    assert seen[1][4] == log_z  # set once, at the first step only
    # log Z stands in for the flow of s_0 (cannot stop): its pterm slot is -log Z
    assert log_pterm[:, 0].eq(-log_z).all()


def test_choice_log_likelihoods_match_brute_force(lm):
    """Each choice's answer text (different token lengths) after each whole rationale, and
    after the empty one."""
    model, tok = lm
    task = _task(lm)
    rows = [tok.encode("ab"), [], tok.encode("xyz")]
    choices = ["5", "no", "maybe"]
    got = task.choice_log_likelihoods(0, rows, choices)
    assert got.shape == (3, 3)
    prompt = tok.encode(task.prompts[0])
    for b, row in enumerate(rows):
        for c, choice in enumerate(choices):
            want = brute_force_answer(model, prompt, row, task.termination_token_id,
                                      tok.encode(f" A: {choice}"))
            assert got[b, c].item() == pytest.approx(want, abs=2e-4), (b, c)
    with pytest.raises(ValueError, match="answer_template: the choices has no tokens"):
        LatentReasoningTask(tok, ["x"], ["y"], model, answer_template="{answer}"
                            ).choice_log_likelihoods(0, [[]], [""])


def _greedy_rationale(model, prompt, term, max_new, min_new):
    """Greedy decoding by hand: the argmax token at each step, termination forbidden before
    min_new tokens, stopping at termination (full forward passes, no cache)."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for t in range(max_new):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            if t < min_new:
                logits[term] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == term:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_answer_accuracy(lm, tmp_path):
    """Per question: eval_rationales sampled rationales, one greedy rationale and the empty
    one, scored in one call. Greedy: the likeliest choice after the greedy rationale (which
    equals greedy decoding by hand); majority: the most frequent per-rationale choice; mean
    probability: the largest mean of the choice probabilities normalised over the choices;
    zero-shot: the empty rationale, its scores equal to a float64 brute force. Only the first
    eval_questions questions count."""
    from fastgfn.trainer.engines.torch_engine import TorchEngine

    model, tok = lm
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "ab", "answer": "yes"}) + "\n")
    cfg = load_config(None, ["model=tiny", "task=reasoning", f"data_path={data}", "termination=.",
                             "eval_rationales=5", "eval_questions=3", "max_new_tokens=3",
                             "min_new_tokens=1", "device=cpu"])
    task = LatentReasoningTask(tok, ["ab", "cd", "ef", "gh"], ["yes", "no", "no", "yes"],
                               model, termination=".", answer_template=" {answer}")
    assert task.choices == ["no", "yes"]
    engine = TorchEngine(copy.deepcopy(model), cfg)
    calls, score = [], task.choice_log_likelihoods

    def spy(i, rows, choices):
        out = score(i, rows, choices)
        calls.append((i, [list(r) for r in rows], out))
        return out

    task.choice_log_likelihoods = spy
    got = task.answer_accuracy(engine, cfg, torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == [0, 1, 2]  # question 3 is not scored
    correct = {"greedy": 0, "majority": 0, "mean": 0, "zero": 0}
    term = task.termination_token_id
    for q, (_, rows, ll) in enumerate(calls):
        assert len(rows) == 7 and rows[-1] == []
        prompt = tok.encode(task.prompts[q])
        assert rows[5] == _greedy_rationale(model, prompt, term, 3, 1)
        truth = task.answers[q]
        votes = [int(x) for x in ll[:5].argmax(1)]
        majority = max(range(2), key=lambda c: (votes.count(c), -c))
        correct["greedy"] += task.choices[int(ll[5].argmax())] == truth
        correct["majority"] += task.choices[majority] == truth
        probs = torch.softmax(ll[:5].double(), 1).mean(0)
        correct["mean"] += task.choices[int(probs.argmax())] == truth
        bf = [brute_force_answer(model, prompt, [], term, tok.encode(f" {c}"))
              for c in task.choices]
        torch.testing.assert_close(ll[6].double(), torch.tensor(bf, dtype=torch.float64),
                                   atol=2e-4, rtol=0)
        correct["zero"] += task.choices[int(torch.tensor(bf).argmax())] == truth
    assert got == {
        "answer_questions": 3,
        "answer_accuracy_greedy": correct["greedy"] / 3,
        "answer_accuracy_majority": correct["majority"] / 3,
        "answer_accuracy": correct["mean"] / 3,
        "zero_shot_accuracy": correct["zero"] / 3,
    }


def test_trainer_reports_answer_accuracy(tmp_path):
    """A reasoning run with evaluation: the before/after table carries the answer accuracy
    on the eval_data_path questions, with the choices of both files."""
    from fastgfn.trainer import Trainer

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"q": q, "a": a}) + "\n"
                             for q, a in (("ab", "yes"), ("cd", "no"))))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"q": "ef", "a": "maybe"}, {"q": "gh", "a": "no"}]))
    cfg = load_config(None, [
        "model=tiny", "tiny_hidden=32", "tiny_layers=1", "task=reasoning",
        f"data_path={train}", f"eval_data_path={test}", "question_key=q", "answer_key=a",
        "termination=.", "batch_size=4", "max_new_tokens=3", "steps=2", "eval_samples=4",
        "eval_rationales=2", "progress=false", "tensorboard=false", "sample_dtype=model",
        "log_z_auto_init=true", f"output_dir={tmp_path / 'o'}",
    ])
    tr = Trainer(cfg)
    assert tr.answer_task.answers == ["maybe", "no"]
    assert tr.answer_task.choices == ["maybe", "no", "yes"]
    results = tr.run()
    for when in ("before", "after"):
        m = results[when]
        assert m["answer_questions"] == 2
        assert m["answer_accuracy"] in (0.0, 0.5, 1.0)
        assert m["zero_shot_accuracy"] in (0.0, 0.5, 1.0)
    # too many distinct answers for a classifier: refused, naming the key
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"q": "x", "a": str(i)}) + "\n" for i in range(40)))
    with pytest.raises(ValueError, match="eval_rationales: .* at most 32, found 40"):
        Trainer(load_config(None, [
            "model=tiny", "tiny_hidden=32", "tiny_layers=1", "task=reasoning",
            f"data_path={many}", "question_key=q", "answer_key=a", "termination=.",
            "eval_samples=4", f"output_dir={tmp_path / 'o2'}",
        ]))
