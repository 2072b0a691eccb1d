import pytest

from fastgfn.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.task == "random_number" and cfg.model == "smollm2"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nlr: 1.0e-4\nloss: tb\nexport_dir: null\n")
    cfg = load_config(p, ["steps=9", "lora=true", "reward_temperature_end=0.5"])
    assert cfg.steps == 9 and cfg.lr == 1e-4 and cfg.loss == "tb"
    assert cfg.lora is True and cfg.reward_temperature_end == 0.5 and cfg.export_dir is None


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


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        if "continuation" in f.name:
            load_config(f, ["data_path=x"])
        else:
            load_config(f)


def test_compile_sampler_needs_a_replica():
    from fastgfn.train import Trainer

    cfg = load_config(None, ["model=tiny", "sample_dtype=model", "compile_sampler=true",
                             "output_dir=/tmp/fastgfn_compile_sampler_cfg"])
    with pytest.raises(ValueError, match="compile_sampler"):
        Trainer(cfg)
