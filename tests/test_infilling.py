"""The story-infilling task (paper section 4.2): its prefix rewards against a float64 brute
force of log p(X z STOP Y) - log p(X) with the reward LM seeing the beginning alone (not the
policy's prompt), the story files it reads (CSV, JSONL) and the errors that name the file,
row and column, its SFT data and reference middles, and GFlowNet training on it moving the
policy to the posterior over middles (tiny random model)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from fastgfn.trainer import ConfigError, load_config
from fastgfn.trainer.tasks.infilling import (
    DEFAULT_PROMPT,
    Story,
    StoryInfillingTask,
    config_stories,
    read_stories,
    reference_middle,
    sft_pairs,
)

from .test_continuation import _exact_distributions, _kl, _tiny_lm, brute_force_log_reward
from .test_reasoning import brute_force_answer

FIXTURE = Path(__file__).resolve().parents[1] / "fastgfn" / "data" / "stories" / "fixture.csv"
STORIES = [Story("Ann had a cat. It was old.", "It slept all day.", "One day it ran off."),
           Story("Bo saw a kite.", "He ran to it!", "The kite was his.")]


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm(sharpen=8.0)


def test_prefix_rewards_match_brute_force(lm):
    model, tok = lm
    task = StoryInfillingTask(tok, STORIES, model, termination=".")
    enc, term = tok.encode, task.termination_token_id
    bias = task.vocab_bias()
    rows = [enc(" It hid"), [], enc(" x"), enc(" a\nb")]
    T = 7
    for p, story in enumerate(STORIES):
        # the policy sees the template with the ending; the reward LM only the beginning
        assert task.prompts[p] == DEFAULT_PROMPT.format(beginning=story.beginning,
                                                        ending=story.ending)
        assert task.reward_prompt_tokens(p).tolist() == enc(story.beginning)
        assert task.answer_tokens(p).tolist() == enc(" " + story.ending)
        got = task.log_rewards(p, rows, T)
        for b, row in enumerate(rows):
            for t in range(len(row) + 1):
                x, y = enc(story.beginning), enc(" " + story.ending)
                z = brute_force_log_reward(model, x, row[:t], term, bias)
                a = brute_force_answer(model, x, row[:t], term, y)
                assert got[b, t].item() == pytest.approx(z + a, abs=5e-4), (p, b, t)
    # the ending matters: the same middles after story 0's beginning, scored with each ending
    swapped = copy.copy(task)
    swapped.reward_prompt_tokens = lambda i: task.reward_prompt_tokens(0)
    r0, r1 = swapped.log_rewards(0, rows, T), swapped.log_rewards(1, rows, T)
    assert not torch.allclose(r0, r1)


def test_reads_csv_and_jsonl(tmp_path):
    stories = read_stories(FIXTURE, "sentence1,sentence2,sentence3,sentence4,sentence5",
                           "sentence4")
    assert len(stories) == 24
    assert stories[0] == Story(
        "Maria came home late from work. She searched her bag for the house key. The key was "
        "not in any of the pockets.", "She called her neighbor who kept a spare one.",
        "Maria thanked him and finally went inside.")
    jl = tmp_path / "s.jsonl"
    jl.write_text("\n".join(json.dumps({"a": f"A{i}.", "b": f"B{i}.", "c": f"C{i}.",
                                        "d": f"D{i}."}) for i in range(3)) + "\n")
    # another layout: X = a, z = b, Y = c d
    got = read_stories(jl, ["a", "b", "c", "d"], "b")
    assert got[2] == Story("A2.", "B2.", "C2. D2.")
    assert read_stories(jl, "a,b,c,d", "c")[0] == Story("A0. B0.", "C0.", "D0.")


@pytest.mark.parametrize("content, columns, middle, match", [
    ("a,b,c\nx,y,z\n", "a,b,q", "b", r"story_columns: column 'q' is not in '.*s\.csv' "
                                      r"\(it has a, b, c\)"),
    ("a,b,c\nx,y,z\nx,,z\n", "a,b,c", "b", r"data_path: '.*s\.csv' story 2: column 'b' is empty"),
    ("a,b,c\nx,y,z\n", "a,b,c", "a", r"infill_column: must be one of story_columns other "
                                     r"than the first and the last \(b\), got 'a'"),
    ("a,b,c\nx,y,z\n", "a,b", "b", r"story_columns: need at least 3 distinct"),
    ("a,b,c\n", "a,b,c", "b", r"data_path: '.*s\.csv' holds no stories"),
])
def test_bad_story_files_are_named(tmp_path, content, columns, middle, match):
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_stories(path, columns, middle)


def test_config_errors_come_before_the_model_loads(tmp_path):
    base = ["task=infilling", "model=tiny", "termination=.", f"prompt_template={DEFAULT_PROMPT}"]
    with pytest.raises(ConfigError, match="data_path: the infilling task needs"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="data_path: no such story file"):
        load_config(None, [*base, f"data_path={tmp_path / 'none.csv'}"])
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data_path: .* must be a \.csv, \.jsonl or \.json"):
        load_config(None, [*base, f"data_path={tmp_path / 's.txt'}"])
    with pytest.raises(ConfigError, match=r"prompt_template: the infilling task needs"):
        load_config(None, [*base, f"data_path={FIXTURE}", "prompt_template={question}"])
    with pytest.raises(ConfigError, match="heldout_fraction: .* holds out all"):
        load_config(None, [*base, f"data_path={FIXTURE}", "heldout_fraction=0.99"])
    with pytest.raises(ConfigError, match="story_columns: column 'sentence9'"):
        load_config(None, [*base, f"data_path={FIXTURE}", "infill_column=sentence9",
                           "story_columns=sentence1,sentence9,sentence5"])


def test_split_sft_pairs_and_references():
    cfg = load_config("configs/infilling.yaml", ["model=tiny"])
    train, held = config_stories(cfg), config_stories(cfg, heldout=True)
    assert len(train) + len(held) == 24 and len(held) == round(cfg.task.heldout_fraction * 24) > 0
    assert not {s.middle for s in train} & {s.middle for s in held}
    pairs = sft_pairs(cfg)
    assert len(pairs) == len(train)
    prompt, completion, mask = pairs[0]
    assert prompt == DEFAULT_PROMPT.format(beginning=train[0].beginning, ending=train[0].ending)
    assert completion == " " + train[0].middle and completion.endswith(".") and mask is None
    assert reference_middle(STORIES[0]) == " It slept all day"
    assert reference_middle(STORIES[1]) == " He ran to it"  # "!" is not part of the middle
    assert reference_middle(Story("a", "Wait...  ", "b")) == " Wait"


def test_training_learns_the_posterior(tmp_path):
    """SubTB on the infilling task moves the policy to the tempered posterior over middles of
    1-2 tokens, R(z)^(1/T) with R(z) = p(z STOP | X) p(Y | X z STOP) and X the beginning
    alone: the exact KL (both directions) drops by more than half."""
    from fastgfn.trainer import Trainer

    torch.manual_seed(0)
    data = tmp_path / "s.csv"
    data.write_text("s1,s2,s3\nab,cd,ef\n")
    T = 0.5
    cfg = load_config(None, [
        "model=tiny", "tiny_hidden=32", "tiny_layers=2", "task=infilling",
        f"data_path={data}", "story_columns=s1,s2,s3", "infill_column=s2",
        "heldout_fraction=0", "prompt_template=B{beginning}E{ending}M", "termination=.",
        "batch_size=32", "max_new_tokens=2", "min_new_tokens=1", "steps=200", "lr=3e-3",
        f"reward_temperature={T}", "log_z_auto_init=true", "warmup_steps=0",
        "lr_schedule=constant", "log_z_lr=0.05", "replay_prob=0.25", "explore_prob=0.25",
        "explore_vocab_prob=0", "progress=false", "eval_samples=0", "sample_dtype=model",
        "seed=1", f"output_dir={tmp_path / 'o'}",
    ])
    tr = Trainer(cfg)
    policy, task = tr.engine.module, tr.task
    assert isinstance(task, StoryInfillingTask) and task.prompts == ["BabEefM"]
    with torch.no_grad():  # the same peaked LM for the frozen reward and the initial policy
        for m in (policy, task.reward_model):
            m.model.norm.weight.mul_(8.0)
    logq, logt = _exact_distributions(policy, task, T)
    kl0, rkl0 = _kl(logt, logq), _kl(logq, logt)
    policy.train()
    tr.run()
    logq, logt = _exact_distributions(policy, task, T)
    kl1, rkl1 = _kl(logt, logq), _kl(logq, logt)
    print(f"KL(target||policy) {kl0:.3f} -> {kl1:.3f}; KL(policy||target) {rkl0:.3f} -> "
          f"{rkl1:.3f}")
    assert kl0 > 0.3 and kl1 < 0.5 * kl0 and rkl1 < 0.5 * rkl0


def test_paper_config_loads_on_a_story_file():
    """configs/paper/infilling.yaml (the paper's settings) is a valid config once data_path
    names a story file (ROCStories is not shipped)."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "fastgfn" / "configs" / "paper" / "infilling.yaml",
                      [f"data_path={FIXTURE}"])
    s = cfg.sampling
    assert (cfg.task.name, s.max_new_tokens, s.min_new_tokens, s.batch_size) == \
        ("infilling", 25, 5, 64)
    assert (cfg.objective.reward_temperature, cfg.objective.reward_temperature_end) == (1.1, 0.85)
