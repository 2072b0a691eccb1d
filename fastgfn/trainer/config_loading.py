"""Loading a training configuration: defaults <- a YAML file <- ``key=value`` overrides, then
validation (``fastgfn.trainer.config.validate``).

Files are found wherever the user is: ``--config`` names a YAML file, or a config shipped with
fastgfn by its name (``configs/continuation.yaml``, ``continuation.yaml`` or ``continuation``
all find the packaged ``fastgfn/configs/continuation.yaml`` when no such file exists here;
``paper/continuation`` the paper's settings in ``fastgfn/configs/paper/``).
Relative paths inside a config file (``data_path``, ``eval_data_path``, ``deepspeed_config``)
are taken relative to the config file, else to the fastgfn package (where the task data it
ships lives: ``data/gfn-lm-tuning/...``); on the command line, relative to the working
directory, else to the package. So a shipped config runs from any directory and from a pip
install.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

from fastgfn.trainer.config import Config, validate
from fastgfn.trainer.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # fastgfn/
PACKAGED_CONFIGS = PACKAGE_DIR / "configs"
PATH_KEYS = ("data_path", "eval_data_path", "deepspeed_config")


def _coerce(key: str, value, typ):
    """Convert ``value`` (from YAML or a ``key=value`` string) to the field type ``typ``."""
    args = typing.get_args(typ)
    optional = (typing.get_origin(typ) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if typ is list or typing.get_origin(typ) is list:  # a YAML list or "a,b"
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of names or a comma-separated string, got "
                          f"{value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def from_dict(values: dict, base: Config | None = None) -> Config:
    """``base`` (or the defaults) with the flat keys of ``values`` set, each converted to its
    field's type; the ``task`` key first, since it decides which task keys exist."""
    cfg = base.replace() if base is not None else Config()
    if "task" in values:
        cfg.set("task", _coerce("task", values["task"], str))
    for key, value in values.items():
        if key != "task":
            cfg.set(key, _coerce(key, value, cfg.field_type(key)))
    return cfg


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def find_config_file(name: str | Path) -> Path:
    """The YAML (or DeepSpeed JSON) file ``name`` refers to: the file itself when it exists,
    else the packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    relative = Path(*parts) if parts else path
    for candidate in (relative, relative.with_name(relative.name + ".yaml")):
        packaged = PACKAGED_CONFIGS / candidate
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config: no such file {str(name)!r} (nor a packaged config of that name)")


def resolve_path(value: str | None, base: Path) -> str | None:
    """A relative path against ``base``, then against the fastgfn package; unchanged when it
    exists in neither (the check that follows names the key)."""
    if value is None or Path(value).is_absolute():
        return value
    for root in (base, PACKAGE_DIR):
        if (root / value).exists():
            return str(root / value)
    if Path(value).name.endswith(".json") and (PACKAGED_CONFIGS / Path(value).name).is_file():
        return str(PACKAGED_CONFIGS / Path(value).name)  # a shipped DeepSpeed config by name
    return value


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; a ``ConfigError`` naming the file (and the line of a syntax
    error) when it cannot be read or parsed."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config: {path}:{where} YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of key: value")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then validation."""
    cfg = Config()
    if path is not None:
        path = find_config_file(path)
        data = _read_yaml(path)
        cfg = from_dict(data, cfg)
        for key in PATH_KEYS:
            if key in data:
                cfg.set(key, resolve_path(cfg.get(key), path.parent))
    if overrides:
        values = parse_overrides(overrides)
        cfg = from_dict(values, cfg)
        for key in PATH_KEYS:
            if key in values:
                cfg.set(key, resolve_path(cfg.get(key), Path.cwd()))
    return validate(cfg)
