"""The DeepSpeed config a run gets (`fastgfn/trainer/engines/ds_config.py`), without
DeepSpeed: the shipped ZeRO configs, offload detection, who builds the optimizer (an AdamW
section added under optimizer offload), fastgfn's lr and weight decay put into an
``optimizer`` section, and the files refused before anything loads (a ``scheduler`` section,
an NVMe offload path that is not a directory, bad JSON)."""

import json
from pathlib import Path

import pytest

from fastgfn.trainer import load_config
from fastgfn.trainer.engines.ds_config import load_ds_config, offload_devices
from fastgfn.trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "fastgfn" / "configs"


def _cfg(path, *extra):
    return load_config(None, ["model=tiny", f"deepspeed_config={path}", *extra])


def _write(tmp_path, ds: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize(
    "name, stage, offload",
    [
        ("ds_zero2", 2, {}),
        ("ds_zero3", 3, {}),
        ("ds_zero2_offload", 2, {"offload_optimizer": "cpu"}),
        ("ds_zero3_offload", 3, {"offload_optimizer": "cpu", "offload_param": "cpu"}),
        ("ds_zero3_nvme", 3, {"offload_optimizer": "nvme", "offload_param": "nvme"}),
    ],
)
def test_shipped_configs(name, stage, offload):
    ds = json.loads((CONFIGS / f"{name}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert offload_devices(ds) == offload
    assert "scheduler" not in ds
    # offload configs name DeepSpeed's optimizer (its CPU Adam), the others leave it to fastgfn
    assert ("optimizer" in ds) == bool(offload)


def test_packaged_offload_config_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged file is found
    cfg = load_config(None, ["model=tiny", "deepspeed_config=configs/ds_zero3_offload.json"])
    assert Path(cfg.run.deepspeed_config).resolve() == (CONFIGS / "ds_zero3_offload.json").resolve()
    ds = load_ds_config(cfg)
    assert offload_devices(ds) == {"offload_optimizer": "cpu", "offload_param": "cpu"}


def test_offload_gets_adamw_with_fastgfn_lr_and_weight_decay(tmp_path):
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    got = load_ds_config(_cfg(_write(tmp_path, ds), "lr=3e-4", "weight_decay=0.1", "grad_clip=0.5"))
    assert got["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}}
    assert got["gradient_clipping"] == 0.5 and got["train_micro_batch_size_per_gpu"] == 1


def test_no_offload_no_section_leaves_the_optimizer_to_fastgfn(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert "optimizer" not in load_ds_config(_cfg(_write(tmp_path, ds)))
    assert "optimizer" not in load_ds_config(_cfg(CONFIGS / "ds_zero2.json"))


def test_optimizer_section_keeps_its_params_but_not_lr_or_weight_decay(tmp_path):
    ds = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "Adam", "params": {"lr": 1.0, "betas": [0.8, 0.9], "eps": 1e-6}},
    }
    with pytest.warns(UserWarning, match=r"optimizer.params.lr=1.0 is replaced .* lr=0.002"):
        got = load_ds_config(_cfg(_write(tmp_path, ds), "lr=2e-3"))
    assert got["optimizer"] == {
        "type": "Adam",
        "params": {"lr": 2e-3, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.0},
    }


def test_scheduler_section_refused(tmp_path):
    ds = {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(ConfigError, match=r"deepspeed_config: .*'scheduler' section.*warmup_steps"):
        load_ds_config(_cfg(_write(tmp_path, ds)))


def test_nvme_placeholder_path_refused_until_set(tmp_path):
    with pytest.raises(ConfigError, match=r"offload_optimizer.nvme_path '/local_nvme' is not"):
        load_ds_config(_cfg(CONFIGS / "ds_zero3_nvme.json"))
    ds = json.loads((CONFIGS / "ds_zero3_nvme.json").read_text())
    for key in ("offload_optimizer", "offload_param"):
        ds["zero_optimization"][key]["nvme_path"] = str(tmp_path)
    got = load_ds_config(_cfg(_write(tmp_path, ds)))
    assert got["optimizer"]["params"]["lr"] == 5e-5


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"deepspeed_config: .*ds.json' is not valid JSON"):
        load_ds_config(_cfg(path))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_ds_config(_cfg(path))
