"""The training configuration: typed sections (``fastgfn.trainer.sections``) and the task's
own section (its ``Options``, declared by the task), built from flat keys as the YAML files
and ``key=value`` overrides write them, with the checks of ranges and choices that run before
anything loads. Every error names the offending key. Loading (YAML, overrides, path
resolution) is ``fastgfn.trainer.config_loading``.

    from fastgfn.trainer import load_config
    cfg = load_config("configs/random_number.yaml", ["steps=10", "lr=1e-4"])
    cfg.sampling.batch_size, cfg.objective.loss, cfg.task.termination

A flat key names one field of one section under the same name; ``model`` and ``task`` are
the ``name`` of their sections. Which keys the task section has depends on the task: a key of
another task is refused with the tasks that have it. ``to_dict`` gives the flat keys back
(checkpoints, the model card, the run's config file).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.reporting.metrics_log import resolve_report_to
from fastgfn.trainer.sections import SECTIONS

# flat key -> (section, field) for every section but the task's
_STATIC = {**{f.name: (s, f.name) for s, cls in SECTIONS.items()
              for f in dataclasses.fields(cls) if f.name != "name"}, "model": ("model", "name")}


def task_options_class(name: str):
    """The ``Options`` section class of the task named ``name``."""
    from fastgfn.trainer.tasks import task_class

    return task_class(name).Options


class Config:
    """A run's configuration in sections: ``model``, ``task`` (the task's ``Options``),
    ``sampling``, ``objective``, ``optimisation``, ``evaluation`` and ``run``. ``Config(**flat)``
    takes flat keys (``Config(task="reasoning", batch_size=8)``)."""

    def __init__(self, **flat):
        for name, cls in SECTIONS.items():
            setattr(self, name, cls())
        self.task = task_options_class(flat.get("task", "random_number"))()
        self._task_keys_set: set[str] = set()
        self.update(flat)

    # flat keys ----------------------------------------------------------------------------
    def _locate(self, key: str) -> tuple[object, str] | None:
        """``(section, field)`` of flat key ``key``, or None when this config has no such key."""
        if key in _STATIC:
            section, attr = _STATIC[key]
            return getattr(self, section), attr
        if key == "task":
            return self.task, "name"
        names = {f.name for f in dataclasses.fields(self.task)} - {"name"}
        return (self.task, key) if key in names else None

    def _where(self, key: str) -> tuple[object, str]:
        found = self._locate(key)
        if found is None:
            raise unknown_key(key, self.task.name)
        return found

    def field_type(self, key: str):
        """The declared type of flat key ``key`` (for coercing strings and YAML values)."""
        import typing

        section, attr = self._where(key)
        return typing.get_type_hints(type(section))[attr]

    def get(self, key: str):
        section, attr = self._where(key)
        return getattr(section, attr)

    def set(self, key: str, value) -> None:
        """Set flat key ``key``; ``task`` switches the task section to that task's options,
        keeping the task keys set so far (refused when the new task does not have one)."""
        if key == "task":
            self._switch_task(value)
            return
        section, attr = self._where(key)
        setattr(section, attr, value)
        if section is self.task:
            self._task_keys_set.add(key)

    def update(self, flat: dict) -> None:
        if "task" in flat:
            self.set("task", flat["task"])
        for key, value in flat.items():
            if key != "task":
                self.set(key, value)

    def _switch_task(self, name) -> None:
        if not isinstance(name, str):
            raise ConfigError(f"task: must be a task name, got {name!r}")
        if name == self.task.name:
            return
        cls = task_options_class(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: getattr(self.task, k) for k in sorted(self._task_keys_set)}
        for key in kept:
            if key not in fields:
                raise unknown_key(key, name)
        self.task = cls(name=name, **kept)

    def to_dict(self) -> dict:
        out = {}
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                out["model" if (name, key) == ("model", "name") else key] = value
        for key, value in dataclasses.asdict(self.task).items():
            out["task" if key == "name" else key] = value
        return out

    def replace(self, **flat) -> Config:
        """A copy with the flat keys ``flat`` changed (not validated again)."""
        new = copy.deepcopy(self)
        new.update(flat)
        return new

    @classmethod
    def from_saved(cls, saved: dict) -> Config:
        """The config a run saved (``to_dict`` in its checkpoint or results), keeping the keys
        this task still has (older runs recorded every task's keys)."""
        cfg = cls(task=saved.get("task", "random_number"))
        cfg.update({k: v for k, v in saved.items() if k != "task" and cfg.has(k)})
        return cfg

    def has(self, key: str) -> bool:
        return self._locate(key) is not None

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Config({parts})"

    @property
    def model_dir(self) -> Path:
        """Where the run's fine-tuned Hugging Face model is written at the end."""
        run = self.run
        return Path(run.export_dir) if run.export_dir else Path(run.output_dir) / "model"


def unknown_key(key: str, task: str) -> ConfigError:
    """The error for a key the config of task ``task`` does not have: the tasks that have it,
    or the keys it is close to."""
    from fastgfn.trainer.tasks import TASKS

    owners = [name for name in TASKS if key in
              {f.name for f in dataclasses.fields(task_options_class(name))} - {"name"}]
    if owners:
        return ConfigError(f"{key}: not an option of task {task!r} (it is one of task "
                           f"{', '.join(repr(o) for o in owners)})")
    names = set(_STATIC) | {"task"} | {
        f.name for f in dataclasses.fields(task_options_class(task))}
    close = difflib.get_close_matches(key, sorted(names), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{key}: unknown configuration key{hint}")


def validate(cfg: Config) -> Config:
    """Check every section, the task's options and what ties sections together; raise
    ``ConfigError`` naming the key."""
    from fastgfn.trainer.tasks import task_class

    for name in SECTIONS:
        getattr(cfg, name).check()
    cfg.task.check()
    task = task_class(cfg.task.name)
    task.check_config(cfg)
    _check_tool(cfg, task)
    if cfg.model.attn_implementation == "flash_attention_2":
        from fastgfn.trainer.model.loading import require_flash_attn

        require_flash_attn()
    resolve_report_to(cfg)
    ds = cfg.run.deepspeed_config
    if ds is not None and not Path(ds).is_file():
        raise ConfigError(f"deepspeed_config: no such file {ds!r}")
    _check_mixed_precision(cfg)
    return cfg


def _check_tool(cfg: Config, task) -> None:
    from fastgfn.trainer.tasks.base import Task

    if cfg.task.tool != "none" and cfg.sampling.dead_ends and \
            task.dead_index is not Task.dead_index:
        raise ConfigError(f"tool: task {cfg.task.name!r} has dead ends, which a tool does not "
                          "support; set dead_ends=false or tool=none")


def _check_mixed_precision(cfg: Config) -> None:
    mixed = cfg.model.mixed_precision
    if mixed == "no":
        return
    if cfg.model.dtype != "float32":
        raise ConfigError(
            f"mixed_precision: {mixed!r} keeps fp32 master weights and needs "
            f"dtype=float32, got dtype={cfg.model.dtype!r}"
        )
    if cfg.run.deepspeed_config is not None:
        raise ConfigError(
            f"mixed_precision: {mixed!r} is for one plain process; under DeepSpeed "
            "use the DeepSpeed config's bf16 section instead"
        )
