import pytest

from fastgfn.trainer import Config, ConfigError, load_config
from fastgfn.trainer.config_loading import parse_overrides


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.task.name == "random_number" and cfg.model.name == "smollm2"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nlr: 1.0e-4\nloss: tb\nexport_dir: null\n")
    cfg = load_config(p, ["steps=9", "lora=true", "reward_temperature_end=0.5"])
    assert (cfg.optimisation.steps, cfg.optimisation.lr, cfg.objective.loss) == (9, 1e-4, "tb")
    assert cfg.model.lora is True and cfg.objective.reward_temperature_end == 0.5
    assert cfg.run.export_dir is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("stepz=3", "stepz"),
        ("steps=abc", "steps"),
        ("steps=0", "steps"),
        ("lr=-1", "lr"),
        ("loss=ppo", "loss"),
        ("replay_prob=1.5", "replay_prob"),
        ("lora=maybe", "lora"),
        ("min_new_tokens=9", "min_new_tokens"),
        ("explore_temp_low=3", "explore_temp_low"),
        ("task=continuation", "data_path"),
        ("deepspeed_config=/nonexistent.json", "deepspeed_config"),
        ("device=tpu", "device"),
        ("attn_implementation=flash3", "attn_implementation"),
        ("illegal_token_bias=1", "illegal_token_bias"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, [override])


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="did you mean steps"):
        load_config(None, ["stepss=3"])


def test_bad_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(p)


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    assert parse_overrides(["prompt=a=b"]) == {"prompt": "a=b"}


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
    """Every shipped config loads by name from an unrelated directory, and its data files
    (shipped inside the package) resolve to files that exist."""
    from pathlib import Path

    from fastgfn.trainer.config_loading import PACKAGED_CONFIGS

    files = sorted(PACKAGED_CONFIGS.rglob("*.yaml"))
    names = {str(f.relative_to(PACKAGED_CONFIGS).with_suffix("")) for f in files}
    assert names >= {"random_number", "continuation", "reasoning_subj", "paper/continuation",
                     "paper/reasoning_subj"}
    monkeypatch.chdir(tmp_path)
    # configs whose data is not shipped (ROCStories needs a registration): a clear error
    # naming data_path until the user points it at their copy
    user_data = {"paper/infilling": PACKAGED_CONFIGS.parent / "data/stories/fixture.csv"}
    for f in files:
        rel = f.relative_to(PACKAGED_CONFIGS)
        for name in (f"configs/{rel}", str(rel), str(rel.with_suffix(""))):
            own = user_data.get(str(rel.with_suffix("")))
            if own is not None:
                with pytest.raises(ConfigError, match="^data_path: no such story file"):
                    load_config(name)
            cfg = load_config(name, [] if own is None else [f"data_path={own}"])
            for key in ("data_path", "eval_data_path", "deepspeed_config"):
                value = cfg.get(key) if cfg.has(key) else None
                assert value is None or Path(value).is_file(), (name, key, value)


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "prompts.txt").write_text("hello\n")
    (conf / "run.yaml").write_text("task: continuation\ndata_path: prompts.txt\nmodel: tiny\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(conf / "run.yaml").task.data_path == str(conf / "prompts.txt")
    # on the command line, relative to the working directory
    (tmp_path / "mine.txt").write_text("x\n")
    cfg = load_config(conf / "run.yaml", ["data_path=mine.txt"])
    assert cfg.task.data_path == str(tmp_path / "mine.txt")
    with pytest.raises(ConfigError, match="data_path: no such prompts file"):
        load_config(conf / "run.yaml", ["data_path=missing.txt"])
    with pytest.raises(ConfigError, match="config: no such file"):
        load_config(tmp_path / "nothing.yaml")


def test_compile_sampler_needs_a_replica():
    from fastgfn.trainer import Trainer

    cfg = load_config(None, ["model=tiny", "sample_dtype=model", "compile_sampler=true",
                             "output_dir=/tmp/fastgfn_compile_sampler_cfg"])
    with pytest.raises(ValueError, match="compile_sampler"):
        Trainer(cfg)


def test_lr_schedules():
    """Warm-up to 1, then constant, cosine or linear decay to lr_min_ratio at `steps`."""
    from fastgfn.trainer.engines import lr_factor

    for name, mid in (("constant", 1.0), ("cosine", 0.55), ("linear", 0.55)):
        cfg = load_config(None, ["model=tiny", "steps=110", "warmup_steps=10",
                                 f"lr_schedule={name}", "lr_min_ratio=0.1"])
        assert lr_factor(0, cfg.optimisation) == pytest.approx(0.1)
        assert lr_factor(9, cfg.optimisation) == pytest.approx(1.0)
        assert lr_factor(10, cfg.optimisation) == pytest.approx(1.0)
        assert lr_factor(60, cfg.optimisation) == pytest.approx(mid)
        assert lr_factor(110, cfg.optimisation) == pytest.approx(1.0 if name == "constant" else 0.1)
    linear = load_config(None, ["model=tiny", "steps=110", "warmup_steps=10",
                                "lr_schedule=linear", "lr_min_ratio=0"])
    assert lr_factor(35, linear.optimisation) == pytest.approx(0.75)
