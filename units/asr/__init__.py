"""asr unit: Whisper speech recognition (engine.py) and utterance endpointing (endpoint.py)."""
from core.registry import UnitInfo

UNIT = UnitInfo("asr", "units.asr", serves=("whisper",), converter="models.whisper_ct2:convert_manifest",
                # "stackflow": lower case and a final "." as StackFlow writes transcripts (spec §10.3)
                settings={"asr.stream_style": "stackflow"})
