"""The parallel axes, one module each, reached through `AXES` (see base.py for what an axis declares).

Registered in the rank layout's order, slowest first: rank = (dp · pp + pp rank) · tp + tp rank;
ep and cp add no ranks (groups of consecutive dp replicas), so they come last and their degrees
follow dp's.
"""

from autopart.axes import pipeline, data, tensor, expert, context  # noqa: F401  (each registers its axis)
from autopart.axes.base import Axis, GroupRanks, SearchShape, registered

AXES: dict[str, Axis] = {name: registered()[name] for name in ("dp", "pp", "tp", "ep", "cp")}
"""Every axis by name, in the rank layout's order."""

__all__ = ["AXES", "Axis", "GroupRanks", "SearchShape"]
