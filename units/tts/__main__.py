import core.notls  # noqa: F401  (before anything imports asyncio)
from units.tts.unit import TtsUnit

if __name__ == "__main__":
    TtsUnit.main()
