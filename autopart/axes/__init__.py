"""The parallel axes, one module each, reached through `AXES` (see base.py for what an axis declares).

Registered in the rank layout's order, slowest first: rank = (dp · pp + pp rank) · tp + tp rank;
ep adds no ranks (groups of consecutive dp replicas), so it comes last and its degree follows dp's.
"""

from autopart.axes import pipeline, data, tensor, expert  # noqa: F401  (each registers its axis)
from autopart.axes.base import Axis, GroupRanks, SearchShape, registered

AXES: dict[str, Axis] = {name: registered()[name] for name in ("dp", "pp", "tp", "ep")}
"""Every axis by name, in the rank layout's order."""

__all__ = ["AXES", "Axis", "GroupRanks", "SearchShape"]
