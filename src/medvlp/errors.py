"""User-facing errors: each says what went wrong, where, and how to fix it.

The CLI prints these without a traceback and exits non-zero (2 for configuration
errors, 1 for data/runtime errors). Code deep inside the library raises them at the
point where the bad input is first detected, so the message can name the file or key.
"""
from __future__ import annotations


class MedvlpError(Exception):
    """Base class of every error meant for the user rather than the developer."""

    exit_code = 1


class ConfigError(MedvlpError):
    """An invalid config key or value (names the dotted key and the allowed values)."""

    exit_code = 2


class DataError(MedvlpError):
    """A missing, unreadable or inconsistent data file (names the file and the fix)."""


class CheckpointError(MedvlpError):
    """A checkpoint directory that is missing files or does not match the config."""


class EvaluationError(MedvlpError):
    """Evaluation refused to run (e.g. test subjects were seen in pre-training)."""


class SplitFileError(EvaluationError):
    """A label-fraction split file in the evaluation folder that belongs to another run (another
    ``eval.min_positives`` or another dataset). Always stops the evaluation: a task that trains on
    the pool must not skip over it, or its numbers would silently come from other subsets."""
