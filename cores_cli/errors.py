"""Errors a user can fix. The CLI prints these as one line, without a traceback."""

from __future__ import annotations


class CoresError(Exception):
    """A problem with the user's input (a file, an option, a dataset layout).

    The message must name what is wrong and, where it helps, what to do instead.
    """


class ConfigError(CoresError):
    """A configuration file or ``--set`` override that does not fit the schema."""


class CheckpointError(CoresError):
    """A checkpoint directory that is missing, incomplete or does not match its config."""


class InputImageError(CoresError):
    """An image that cannot be read: missing, corrupt, or larger than allowed."""


class UsageError(CoresError):
    """Options that contradict each other: a usage mistake (exit status 2 on the command line)."""
