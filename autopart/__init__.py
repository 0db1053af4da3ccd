"""autopart: partition a PyTorch model across devices with one call."""

from autopart.api import compile
from autopart.calibrate import calibrate
from autopart.compiled import CompiledModel
from autopart.cost_models import Cluster, DeviceSpec
from autopart.core.errors import AutopartError, InputError, MissingAnnotationError, PlanError, TraceError
from autopart.core.plan import Plan
from autopart.frontend.tracing import trace

__all__ = [
    "AutopartError",
    "Cluster",
    "CompiledModel",
    "DeviceSpec",
    "InputError",
    "MissingAnnotationError",
    "Plan",
    "PlanError",
    "TraceError",
    "calibrate",
    "compile",
    "trace",
]
