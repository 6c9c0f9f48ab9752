"""Typed errors. Each message names the problem and the fix in one line.

The CLI prints ``str(err)`` for any ``S2VError`` without a traceback (unless ``--debug``);
library users catch the specific subclass.
"""
from __future__ import annotations


class S2VError(Exception):
    """Base class: a problem the user can fix (bad input, bad checkpoint, bad option)."""

    exit_code = 2


class ConfigError(S2VError):
    """A model or pipeline configuration is invalid or unsupported."""


class CheckpointError(S2VError):
    """A checkpoint folder or file is missing, truncated, corrupt or does not match the model."""


class InputError(S2VError):
    """A request input (image, audio, video, argument) is unusable."""


class OutputError(S2VError):
    """The output cannot be written (exists, directory missing, not writable, disk full)."""


class BackendUnavailable(S2VError):
    """A requested backend or optional dependency is not installed or not usable here."""


class EngineMismatch(S2VError):
    """An engine/ONNX artefact was built for something other than what is requested."""


class NumericalError(S2VError):
    """A stage produced NaN/Inf or absurdly large values: damaged weights, config or engine."""
