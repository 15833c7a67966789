"""The audio unit: the microphone as sys.pcm and the speaker (spec §16.7)."""
from dataclasses import dataclass

from core.registry import UnitInfo


@dataclass(frozen=True)
class AudioSettings:
    """[audio] in unitbus.toml."""
    mute_capture_while_playing: bool = True  # frames captured while the board speaks are marked "playing"
    # Capture: "auto" (ALSA if a capture device exists, else audio.source_wav if set), "alsa", "wav",
    # "push" (only audio a client sends with the audio unit's `capture` action) or "none".
    capture: str = "auto"
    source_wav: str = ""  # a WAV file or a folder of WAV files, played as the microphone in real time
    loop: bool = False  # start audio.source_wav again at its end
    period_ms: int = 10
    capture_device: str = "default"  # ALSA device names for arecord / aplay
    playback: str = "auto"  # "auto" (ALSA if a playback device exists, else audio.play_dir), "alsa", "dir", "none"
    play_dir: str = ""  # where played audio is written as WAV files when there is no playback device
    playback_device: str = "default"


UNIT = UnitInfo("audio", "units.audio", settings=AudioSettings)
