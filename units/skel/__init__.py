"""The template unit: copy it to start a new unit (spec §16, README "Writing a unit")."""
from core.registry import UnitInfo

UNIT = UnitInfo("skel", "units.skel", start_by_default=False)
