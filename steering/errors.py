"""Domain errors of the steering core.

The core raises these; only `steering/api.py` and `steering/ui/` translate them into `gr.Error`
so that a browser user and a `gradio_client` caller read the same sentence.
"""

from __future__ import annotations


class SteeringError(Exception):
    """Base class for every error the core raises on purpose."""


class InputError(SteeringError, ValueError):
    """A request field is out of its allowed range. The message names the field and the range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelUnavailableError(SteeringError):
    """A model cannot be had here: unknown id, gated without a token, offline, or no weights."""


class ModelLockedError(SteeringError):
    """Model switching is disabled (`--lock-model`)."""
