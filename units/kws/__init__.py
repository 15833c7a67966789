"""kws unit: openWakeWord wake words (engine.py) on the microphone or on client audio."""
from core.registry import UnitInfo

UNIT = UnitInfo("kws", "units.kws")
