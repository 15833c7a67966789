"""asr unit: Whisper speech recognition (engine.py) and utterance endpointing (endpoint.py)."""
from dataclasses import dataclass

from core.registry import UnitInfo


@dataclass(frozen=True)
class AsrSettings:
    """[asr] in unitbus.toml."""
    stream_style: str = "stackflow"  # "stackflow": lower case and a final "." as StackFlow writes transcripts (spec §10.3)


UNIT = UnitInfo("asr", "units.asr", serves=("whisper",), converter="models.whisper_ct2:convert_manifest",
                settings=AsrSettings)
