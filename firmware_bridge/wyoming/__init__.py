"""Wyoming (Home Assistant's voice protocol) on the bus: asr, tts, wake and handle from the units."""
