"""The exceptions particlize raises. Every message says what was wrong and what to do."""

from __future__ import annotations


class ParticlizeError(Exception):
    """Base class of every error particlize raises on purpose."""


class UnsupportedModelError(ParticlizeError):
    """No adapter could place (some of) the model's modules into particle groups."""


class PlanError(ParticlizeError):
    """A removal set or a saved plan does not fit the model it is applied to."""


class GateError(ParticlizeError):
    """A gate hook did not fire during a gated forward (the model took a path the adapter did not expect)."""


class CheckpointError(ParticlizeError):
    """A saved model folder is missing, corrupt, truncated or not in particlize's format."""
