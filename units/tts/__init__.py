"""tts unit: Piper voices on onnxruntime, espeak-ng phonemes."""
from core.registry import UnitInfo

UNIT = UnitInfo("tts", "units.tts", serves=("melotts",))
