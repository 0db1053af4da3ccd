"""autopart: partition a PyTorch model across devices with one call."""

from autopart.errors import AutopartError, InputError, MissingAnnotationError, PlanError, TraceError
from autopart.trace import trace

__all__ = [
    "AutopartError",
    "InputError",
    "MissingAnnotationError",
    "PlanError",
    "TraceError",
    "trace",
]
