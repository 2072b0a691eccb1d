"""Errors, not tracebacks: bad config files, data files and termination strings end in one
line ``fastgfn: <kind> error: ...`` naming the file or key, with exit status 2, before the
model loads."""

import re

import pytest

from fastgfn.train import main
from fastgfn.trainer import ConfigError, load_config
from tests.test_train import TINY


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded (the error must come before)."""
    from fastgfn.trainer import run_setup as components
    from fastgfn.trainer.model import loading as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(components, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"^config: .*bad.yaml: line 3, column 1: YAML syntax"):
        load_config(bad)
    assert main(["--config", str(bad)]) == 2
    assert _one_line(capsys).startswith(f"fastgfn: config error: config: {bad}: line 3")


def test_config_that_is_not_utf8_or_a_mapping(tmp_path, capsys):
    (tmp_path / "latin.yaml").write_bytes(b"prompt: caf\xe9\n")
    assert main(["--config", str(tmp_path / "latin.yaml")]) == 2
    assert "cannot read" in _one_line(capsys)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "must hold a mapping" in _one_line(capsys)


@pytest.mark.parametrize("content, match", [
    ("", "holds no prompts"),
    ("\n   \n\n", "holds no prompts"),
    (b"\xff\xfe bad bytes\n", "cannot read the prompts file"),
])
def test_bad_prompts_file(tmp_path, capsys, no_model, content, match):
    data = tmp_path / "prompts.txt"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [*TINY, "task=continuation", f"data_path={data}", f"output_dir={tmp_path / 'o'}"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert line.startswith("fastgfn: config error: data_path:") and match in line
    assert str(data) in line


@pytest.mark.parametrize("name, content, match", [
    ("d.jsonl", '{"question": "a", "answer": "b"}\n\n{bad\n', r"d.jsonl' line 3, column 2"),
    ("d.jsonl", "", "holds no examples"),
    ("d.json", '[{"question": "a", "answer": "b"},\n {"question": }]', r"d.json' line 2"),
    ("d.json", "[]", "holds no examples"),
    ("d.json", '{"question": "a"}', "list of objects"),
    ("d.jsonl", '{"question": "a"}\n', "answer_key: field 'answer' is missing from item 0"),
])
def test_bad_reasoning_data_names_file_and_line(tmp_path, capsys, no_model, name, content,
                                                match):
    data = tmp_path / name
    data.write_text(content)
    args = [*TINY, "task=reasoning", f"data_path={data}", f"output_dir={tmp_path / 'o'}"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert line.startswith("fastgfn: config error: ") and str(tmp_path) in line
    assert re.search(match, line), line


def test_missing_eval_data_is_named(tmp_path, capsys, no_model):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n')
    args = [*TINY, "task=reasoning", f"data_path={data}", f"eval_data_path={tmp_path / 'no.json'}"]
    assert main(args) == 2
    assert "eval_data_path: no such data file" in _one_line(capsys)


@pytest.mark.parametrize("termination, match", [
    ("ab", "must be a single token"),
    ("é", "cannot represent"),
])
def test_termination_is_refused_before_the_model_loads(tmp_path, capsys, no_model, termination,
                                                       match):
    args = [*TINY, f"termination={termination}", f"output_dir={tmp_path}"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert line.startswith("fastgfn: config error: termination:") and match in line
