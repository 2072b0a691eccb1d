"""The errors the training engine raises for things a user can fix. Each message names the
config key, file or argument at fault; the command line prints it as one line
(``fastgfn: config error: ...``) and exits with status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key."""
