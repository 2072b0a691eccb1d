"""What a run leaves besides the model weights, on a tiny random model: the logging targets of
``report_to`` (TensorBoard event files that TensorBoard's own reader loads, a Weights & Biases
offline run with no network), the training-curves PNG, and the model card of the exported
model (Hugging Face format: YAML front matter that parses, with the required fields)."""

import glob
import json
import time
import warnings
from pathlib import Path

import pytest
import yaml

from fastgfn.trainer import ConfigError, Trainer, load_config
from fastgfn.trainer.reporting import metrics_log as metrics_log_module
from fastgfn.trainer.reporting.model_card import model_card
from fastgfn.trainer.reporting.plots import read_step_metrics

TINY = ["model=tiny", "tiny_hidden=32", "batch_size=8", "max_new_tokens=3", "progress=false",
        "eval_samples=0", "steps=3", "loss=tb"]


def _steps(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """One run: TensorBoard on, an evaluation before and after, the model exported."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + [f"output_dir={out}", "report_to=tensorboard",
                                    "eval_samples=32", "eval_batch_size=32"])
    results = Trainer(cfg).run()
    return out, results, cfg


def test_report_to_tensorboard_writes_events_that_tensorboard_reads(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tensorboard_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "log_reward", "log_z", "step_s", "eval_after/valid_fraction"):
        assert tag in tags
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([s["loss"] for s in _steps(out)],
                                                      rel=1e-6)


def test_training_curves_png_is_written_at_the_end(tensorboard_run):
    out, _, _ = tensorboard_run
    png = out / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (800, 1100)  # five panels, one per curve


def test_curves_read_the_latest_run_of_an_appended_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    entries = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]  # run to step 4
    entries += [{"step": s, "loss": 10.0 + s} for s in (3, 4, 5)]  # resumed from step 2
    entries += [{"step": 5, "eval_after/kl": 0.1}]  # not a step line
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n{\"step\": 6, \"lo")
    rows = read_step_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 13.0),
                                                      (4, 14.0), (5, 15.0)]
    path.write_text("\n".join(json.dumps(e) for e in entries + [{"step": 1, "loss": 7.0}]))
    assert [(r["step"], r["loss"]) for r in read_step_metrics(path)] == [(1, 7.0)]  # a rerun


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_exported_model_has_a_model_card(tensorboard_run):
    out, results, cfg = tensorboard_run
    readme = Path(results["model_dir"]) / "README.md"
    meta, body = _front_matter(readme.read_text())
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"fastgfn", "gflownet", "gflownet-tb", "task-random_number"} <= set(meta["tags"])
    assert "base_model" not in meta  # a random test model has no hub id
    for section in ("## Task", "## Objective", "## Training", "## Evaluation",
                    "## Configuration", "## Framework versions"):
        assert section in body
    assert "- steps: 3 " in body and "trajectory balance" in body
    assert "| valid fraction" in body and f"{results['after']['valid_fraction']:.4f}" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == cfg.to_dict()
    from huggingface_hub import ModelCard  # the Hub's own parser agrees

    assert ModelCard.load(readme).data.to_dict()["library_name"] == "transformers"


def test_model_card_names_the_base_model():
    cfg = load_config(None, ["loss=subtb", "subtb_lambda=0.9"])  # the packaged SmolLM2
    after = {"samples": 10, "valid_fraction": 1.0, "kl_uniform": 0.01}
    text = model_card(cfg, steps=150, before=None, after=after, prompt="p: ", log_z=1.5)
    meta, body = _front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "lambda = 0.9" in body and "- final log Z: 1.5000" in body
    assert "| valid fraction" in body and "Prompt: `'p: '`" in body


def test_report_to_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "report_to=wandb", "steps=2",
                                    "save_model=false", "training_curves=false"])
    Trainer(cfg).run()
    import wandb

    wandb.teardown()  # the W&B service writes the run file in the background: let it finish
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    deadline = time.time() + 60
    while b"log_z" not in (data := Path(files[0]).read_bytes()) and time.time() < deadline:
        time.sleep(0.5)
    assert data[:4] == b":W&B"
    first = _steps(tmp_path)[0]
    for key in ("loss", "log_reward", "log_z"):
        assert key.encode() in data
    assert json.dumps(first["loss"]).encode()[:8] in data  # the logged value itself


def test_report_to_parses_and_checks_its_targets(monkeypatch):
    assert load_config(None, []).run.report_to == []  # default: none
    assert load_config(None, ["report_to=none"]).run.report_to == []
    both = load_config(None, ["report_to=tensorboard,wandb"]).run.report_to
    assert both == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="^report_to: unknown logging target 'mlflow'"):
        load_config(None, ["report_to=mlflow"])
    with pytest.raises(ConfigError, match="^report_to: 'none' cannot be combined"):
        load_config(None, ["report_to=none,wandb"])
    real = metrics_log_module.importlib.util.find_spec
    monkeypatch.setattr(metrics_log_module.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"^report_to: 'wandb' needs the wandb package"):
        load_config(None, ["report_to=wandb"])


def test_report_to_from_a_yaml_list_and_the_deprecated_tensorboard_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("report_to: [tensorboard, wandb]\n")
    assert load_config(path).run.report_to == ["tensorboard", "wandb"]
    path.write_text("report_to: [tensorboard, 3]\n")
    with pytest.raises(ConfigError, match="^report_to: expected a list"):
        load_config(path)
    with pytest.warns(FutureWarning, match="report_to=tensorboard"):
        cfg = load_config(None, ["tensorboard=true"])
    assert cfg.run.report_to == ["tensorboard"] and cfg.run.tensorboard is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = load_config(None, ["report_to=tensorboard", "tensorboard=false"])
    assert cfg.run.report_to == []
