"""vad unit: Silero voice activity detection on the microphone or on client audio."""
from core.registry import UnitInfo

UNIT = UnitInfo("vad", "units.vad")
