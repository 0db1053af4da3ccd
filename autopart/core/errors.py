"""Errors autopart raises. Each message names the thing, the value and a fix."""

from __future__ import annotations


class AutopartError(Exception):
    """Base class of every error autopart raises on purpose."""


class TraceError(AutopartError):
    """The model could not be captured as a graph."""


class PlanError(AutopartError):
    """No partition satisfies the constraints (memory, device count, user choices)."""


class InputError(AutopartError, ValueError):
    """An argument given to autopart makes no sense (bad devices, batch, microbatches)."""


class MissingAnnotationError(AutopartError):
    """A pass found a node without the metadata an earlier pass should have written."""
