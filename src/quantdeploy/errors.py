"""Errors a user can cause.

Every exception here carries one line that says what is wrong and what to do about it. The CLI prints
that line and exits non-zero; it never shows a traceback for these. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class QuantDeployError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message, one line."""


class ConfigError(QuantDeployError):
    """A config, recipe or CLI option is invalid (unknown key, bad value, impossible combination)."""


class ModelSourceError(QuantDeployError):
    """A model path is missing, is not a model, or needs a package that is not installed."""


class CheckpointError(QuantDeployError):
    """A quantdeploy checkpoint folder is corrupt, truncated, incomplete or from an unknown version."""


class DataError(QuantDeployError):
    """Evaluation or calibration text is missing, empty, too short or in the wrong format."""


class RequestError(QuantDeployError):
    """A generation request cannot be served as asked (prompt or max_tokens beyond the context window)."""
