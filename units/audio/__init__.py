"""The audio unit: the microphone as sys.pcm and the speaker (spec §16.7)."""
from core.registry import UnitInfo

UNIT = UnitInfo("audio", "units.audio", settings={
    "audio.mute_capture_while_playing": True,
    # Capture: "auto" (ALSA if a capture device exists, else audio.source_wav if set), "alsa", "wav",
    # "push" (only audio a client sends with the audio unit's `capture` action) or "none".
    "audio.capture": "auto",
    "audio.source_wav": "",  # a WAV file or a folder of WAV files, played as the microphone in real time
    "audio.loop": False,  # start audio.source_wav again at its end
    "audio.period_ms": 10,
    "audio.capture_device": "default",  # ALSA device names for arecord / aplay
    "audio.playback": "auto",  # "auto" (ALSA if a playback device exists, else audio.play_dir), "alsa", "dir", "none"
    "audio.play_dir": "",  # where played audio is written as WAV files when there is no playback device
    "audio.playback_device": "default",
})
