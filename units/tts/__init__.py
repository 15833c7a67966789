"""tts unit: Piper voices on onnxruntime, espeak-ng phonemes."""
