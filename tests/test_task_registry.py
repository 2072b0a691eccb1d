"""Adding a task is one new file plus its registry line: a throwaway task written here, with a
key of its own, trains, writes its model card, gives the SFT baseline its examples, and has
its key checked and refused for the other tasks, without any other file of fastgfn knowing
about it."""

import textwrap

import pytest

from fastgfn.trainer import ConfigError, Trainer, load_config
from fastgfn.trainer.tasks import TASKS

PARITY_TASK = textwrap.dedent('''
    """Digits with an even sum: a task of its own file."""
    from dataclasses import dataclass

    import torch

    from fastgfn.trainer.errors import ConfigError
    from fastgfn.trainer.tasks.base import Task, termination_token
    from fastgfn.trainer.tasks.options import TaskOptions


    @dataclass
    class ParityOptions(TaskOptions):
        parity_digits: int = 2  # how many digits a valid answer has

        def check(self):
            super().check()
            if self.parity_digits < 1:
                raise ConfigError(f"parity_digits: must be >= 1, got {self.parity_digits}")


    class ParityTask(Task):
        name = "parity"
        Options = ParityOptions
        description = "write {parity_digits} digits whose sum is even"

        def __init__(self, tokenizer, digits, termination):
            self.tokenizer, self.digits = tokenizer, digits
            self.termination_token_id = termination_token(tokenizer, termination)
            self.prompt = torch.tensor(tokenizer.encode("Digits: ", add_special_tokens=False))

        @classmethod
        def from_config(cls, cfg, tokenizer, reward=None):
            return cls(tokenizer, cfg.task.parity_digits, cfg.task.termination)

        @classmethod
        def sft_pairs(cls, cfg, tokenizer):
            return [("Digits: ", "2" * cfg.task.parity_digits + cfg.task.termination, None)]

        def num_prompts(self):
            return 1

        def prompt_tokens(self, index):
            return self.prompt

        def log_rewards(self, prompt_index, rows, T):
            out = torch.full((len(rows), T + 1), -10.0)
            for b, row in enumerate(rows):
                for t in range(len(row) + 1):
                    text = self.tokenizer.decode(row[:t])
                    if len(text) == self.digits and text.isdigit() and \\
                            sum(map(int, text)) % 2 == 0:
                        out[b, t] = 0.0
            return out
''')

TINY = ["model=tiny", "tiny_hidden=32", "batch_size=4", "max_new_tokens=3", "progress=false",
        "eval_samples=0", "histogram=false", "training_curves=false"]


@pytest.fixture
def parity(tmp_path, monkeypatch):
    """The new file, and its line in the registry."""
    (tmp_path / "parity_task.py").write_text(PARITY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(TASKS, "parity", ("parity_task", "ParityTask"))
    return tmp_path


def test_a_new_task_trains_and_describes_itself(parity):
    cfg = load_config(None, TINY + ["task=parity", "parity_digits=3", "steps=2",
                                    f"output_dir={parity / 'run'}"])
    assert cfg.task.parity_digits == 3 and cfg.to_dict()["parity_digits"] == 3
    results = Trainer(cfg).run()
    card = (parity / "run" / "model" / "README.md").read_text()
    assert "Write 3 digits whose sum is even." in card
    assert "parity_digits: 3" in card  # the card's config lists the task's own key
    assert results["model_dir"] == str(parity / "run" / "model")


def test_a_new_task_gives_the_sft_baseline_its_examples(parity):
    pytest.importorskip("trl")
    from fastgfn.trainer.baselines.sft import task_examples, tasks_with_sft_data

    cfg = load_config(None, TINY + ["task=parity", "parity_digits=2"])
    (example,) = task_examples(cfg, None)
    assert (example.prompt, example.completion) == ("Digits: ", "22,")
    assert "parity" in tasks_with_sft_data() and "random_number" not in tasks_with_sft_data()
    with pytest.raises(ValueError, match="^task: no SFT data for task 'random_number'"):
        task_examples(load_config(None, TINY), None)


def test_a_new_task_checks_its_keys_and_others_refuse_them(parity):
    with pytest.raises(ConfigError, match="^parity_digits: must be >= 1"):
        load_config(None, TINY + ["task=parity", "parity_digits=0"])
    with pytest.raises(ConfigError, match=r"^parity_digits: not an option of task "
                                          r"'random_number' \(it is one of task 'parity'\)"):
        load_config(None, TINY + ["parity_digits=2"])
    with pytest.raises(ConfigError, match="^question_key: not an option of task 'parity'"):
        load_config(None, TINY + ["task=parity", "question_key=q"])
    with pytest.raises(ConfigError, match="^parity_digit: unknown configuration key; did you "
                                          "mean parity_digits"):
        load_config(None, TINY + ["task=parity", "parity_digit=2"])
