"""asr unit: Whisper speech recognition (engine.py) and utterance endpointing (endpoint.py)."""
