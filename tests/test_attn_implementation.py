"""attn_implementation=auto: flash-attn 2 where it applies (installed, CUDA, 16-bit, supported
by the model class), SDPA otherwise. This machine has neither flash-attn nor CUDA, so the
"is flash_attn importable" and "is CUDA available" checks are monkeypatched."""

import logging

import pytest

import fastgfn.trainer.model.loading as models
from fastgfn.trainer import Config, ConfigError, load_config


@pytest.fixture
def env(monkeypatch):
    """Set the facts the decision reads: flash-attn importable, CUDA available."""

    def set_(flash: bool, cuda: bool):
        monkeypatch.setattr(models, "flash_attn_installed", lambda: flash)
        monkeypatch.setattr(models, "cuda_available", lambda: cuda)

    return set_


def _cfg(**kw):
    base = {"model": "tiny", "device": "auto", "dtype": "bfloat16"}
    base.update(kw)
    return Config(**base)


def test_default_is_auto():
    assert Config().model.attn_implementation == "auto"
    assert load_config(None).model.attn_implementation == "auto"


def test_auto_picks_flash_when_everything_applies(env):
    env(flash=True, cuda=True)
    assert models.resolve_attn_implementation(_cfg(), log=False) == "flash_attention_2"
    assert models.resolve_attn_implementation(_cfg(dtype="float16"), log=False) == (
        "flash_attention_2"
    )
    # an explicit CUDA device counts even where torch reports none (the engine would fail)
    env(flash=True, cuda=False)
    assert models.resolve_attn_implementation(_cfg(device="cuda:1"), log=False) == (
        "flash_attention_2"
    )


@pytest.mark.parametrize(
    "flash, cuda, overrides",
    [
        (False, True, {}),  # flash-attn not installed
        (True, False, {}),  # auto device, no CUDA: the model stays on the CPU
        (True, True, {"device": "cpu"}),  # CUDA available but the model is placed on the CPU
        (True, True, {"dtype": "float32"}),  # flash-attn 2 has no fp32 kernels
    ],
)
def test_auto_falls_back_to_sdpa(env, flash, cuda, overrides):
    env(flash=flash, cuda=cuda)
    assert models.resolve_attn_implementation(_cfg(**overrides), log=False) == "sdpa"


def test_auto_respects_model_class_support(env, monkeypatch):
    env(flash=True, cuda=True)

    class NoFlash:
        _supports_flash_attn = False

    class LegacyFlag:  # remote-code classes of older transformers spell it this way
        _supports_flash_attn_2 = True

    monkeypatch.setattr(models, "model_class", lambda cfg: NoFlash)
    assert models.resolve_attn_implementation(_cfg(), log=False) == "sdpa"
    monkeypatch.setattr(models, "model_class", lambda cfg: None)  # unknown architecture
    assert models.resolve_attn_implementation(_cfg(), log=False) == "sdpa"
    monkeypatch.setattr(models, "model_class", lambda cfg: LegacyFlag)
    assert models.resolve_attn_implementation(_cfg(), log=False) == "flash_attention_2"


def test_model_class_of_a_directory(tmp_path):
    from transformers import LlamaForCausalLM

    models.tiny_config(32, 1).save_pretrained(tmp_path / "llama")
    assert models.model_class(_cfg(model=str(tmp_path / "llama"))) is LlamaForCausalLM
    assert models.supports_flash_attn(LlamaForCausalLM)
    assert models.model_class(_cfg(model="tiny")) is LlamaForCausalLM
    # an unreadable model gives None (and so sdpa), not an exception
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-arch"}')
    assert models.model_class(_cfg(model=str(tmp_path / "broken"))) is None
    assert not models.supports_flash_attn(None)


@pytest.mark.parametrize("explicit", ["sdpa", "eager"])
def test_explicit_values_are_kept(env, explicit):
    env(flash=True, cuda=True)
    assert models.resolve_attn_implementation(_cfg(attn_implementation=explicit), log=False) == (
        explicit
    )


def test_explicit_flash_without_flash_attn_is_an_error(env):
    env(flash=False, cuda=True)
    with pytest.raises(ValueError, match=r"^attn_implementation: .*flash-attn"):
        models.resolve_attn_implementation(_cfg(attn_implementation="flash_attention_2"))
    # caught up front, when the config is loaded
    with pytest.raises(ConfigError, match=r"^attn_implementation:"):
        load_config(None, ["attn_implementation=flash_attention_2"])
    env(flash=True, cuda=True)
    cfg = load_config(None, ["attn_implementation=flash_attention_2", "dtype=bfloat16"])
    assert models.resolve_attn_implementation(cfg, log=False) == "flash_attention_2"


def test_unknown_value_names_the_key():
    with pytest.raises(ConfigError, match=r"^attn_implementation:"):
        load_config(None, ["attn_implementation=flash3"])


def test_load_model_uses_and_logs_the_choice(caplog):
    cfg = load_config(None, ["model=tiny", "tiny_hidden=32", "tiny_layers=1"])
    with caplog.at_level(logging.INFO, logger="fastgfn.trainer.model.loading"):
        model, _ = models.load_model(cfg)
    assert model.config._attn_implementation == "sdpa"  # no flash-attn, no CUDA here
    assert any("attention: sdpa" in r.getMessage() for r in caplog.records)
    cfg = load_config(None, ["model=tiny", "tiny_hidden=32", "tiny_layers=1",
                             "attn_implementation=eager"])
    model, _ = models.load_model(cfg)
    assert model.config._attn_implementation == "eager"
