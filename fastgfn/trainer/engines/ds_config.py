"""The DeepSpeed config of a run, read and reconciled with the fastgfn config before anything
loads (no deepspeed import here).

fastgfn's config stays authoritative for what it has keys for: the micro-batch (1 prompt),
``grad_accum``, ``grad_clip``, and the optimizer's ``lr`` and ``weight_decay``; the learning
rate follows ``lr_factor`` (``warmup_steps``, ``lr_schedule``, ``lr_min_ratio``), so a
``scheduler`` section is refused. Who builds the optimizer:

- no ``optimizer`` section and no optimizer offload: fastgfn's torch AdamW, passed to
  ``deepspeed.initialize``;
- an ``optimizer`` section (its type, betas, eps, ... as given; ``lr`` and ``weight_decay``
  replaced by the fastgfn values): DeepSpeed builds it;
- optimizer offload (``zero_optimization.offload_optimizer.device`` ``cpu`` or ``nvme``)
  without an ``optimizer`` section: an AdamW section is added, so DeepSpeed builds its CPU
  Adam (``DeepSpeedCPUAdam``, AdamW mode), which ZeRO-Offload needs (it refuses a torch
  optimizer).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from fastgfn.trainer.errors import ConfigError

OFFLOAD_DEVICES = ("cpu", "nvme")


def offload_devices(ds: dict) -> dict[str, str]:
    """``{"offload_optimizer": device, "offload_param": device}`` for the offloads a DeepSpeed
    config turns on (device ``cpu`` or ``nvme``)."""
    zero = ds.get("zero_optimization") or {}
    out = {}
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none")).lower()
        if device in OFFLOAD_DEVICES:
            out[key] = device
    return out


def read_ds_file(path) -> dict:
    """The JSON object in ``path``; a ConfigError naming the file otherwise."""
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"deepspeed_config: cannot read {str(path)!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config: {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config: {str(path)!r} must hold a JSON object")
    return ds


def check_ds_config(ds: dict, path: str) -> None:
    """Refuse what fastgfn would silently override or what cannot run: a ``scheduler``
    section, an NVMe offload whose ``nvme_path`` is not a directory."""
    if "scheduler" in ds:
        raise ConfigError(
            f"deepspeed_config: {path!r} has a 'scheduler' section; fastgfn drives the learning "
            "rate itself (lr, warmup_steps, lr_schedule, lr_min_ratio): remove the section"
        )
    zero = ds.get("zero_optimization") or {}
    for key, device in offload_devices(ds).items():
        nvme = zero[key].get("nvme_path")
        if device == "nvme" and not (nvme and Path(nvme).is_dir()):
            raise ConfigError(
                f"deepspeed_config: {path!r}: zero_optimization.{key}.nvme_path {nvme!r} is not "
                "a directory; set it to a directory on a local NVMe drive (every rank writes "
                "its partition there)"
            )


def _set_optimizer_params(ds: dict, cfg, path: str) -> None:
    """Add an AdamW section under optimizer offload; put fastgfn's lr and weight decay in."""
    if "optimizer" not in ds and "offload_optimizer" in offload_devices(ds):
        ds["optimizer"] = {"type": "AdamW", "params": {}}
    if "optimizer" not in ds:
        return
    params = ds["optimizer"].setdefault("params", {})
    opt = cfg.optimisation
    for key, value in (("lr", opt.lr), ("weight_decay", opt.weight_decay)):
        if key in params and params[key] != value:
            warnings.warn(
                f"deepspeed_config {path!r}: optimizer.params.{key}={params[key]!r} is replaced "
                f"by the fastgfn config's {key}={value!r}",
                stacklevel=3,
            )
        params[key] = value


def load_ds_config(cfg) -> dict:
    """The DeepSpeed config of a run: the ``deepspeed_config`` file (or a stage-0 default)
    with the micro-batch, accumulation, clipping and the optimizer's lr and weight decay
    taken from the fastgfn config."""
    ds = {"zero_optimization": {"stage": 0}}
    path = cfg.run.deepspeed_config
    if path:
        ds = read_ds_file(path)
        check_ds_config(ds, path)
        _set_optimizer_params(ds, cfg, path)
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = cfg.optimisation.grad_accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.optimisation.grad_clip
    return ds
