"""The errors the training engine raises for things a user can fix. Each message names the
config key, file or argument at fault; the command line prints it as one line
(``fastgfn: <kind> error: ...``) and exits with status 2."""

from __future__ import annotations


class FastgfnError(Exception):
    """Base of the errors the command line reports as one line (``kind`` names the class of
    problem in that line)."""

    kind = "fastgfn"


class ConfigError(FastgfnError, ValueError):
    """A bad configuration value or file; the message names the key."""

    kind = "config"


class CheckpointError(FastgfnError, ValueError):
    """A checkpoint that cannot be written, read or trusted; the message names the file."""

    kind = "checkpoint"


class IncompatibleCheckpointError(CheckpointError):
    """A sound checkpoint this run must not load (another engine or ZeRO stage, a config that
    changed without ``allow_config_change``): resume stops instead of trying an older one."""


class DiskFullError(CheckpointError):
    """A checkpoint save ran out of disk space (the previous checkpoint is kept)."""


class TrainingError(FastgfnError, RuntimeError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""

    kind = "training"
