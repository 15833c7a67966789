import core.notls  # noqa: F401  (before anything imports asyncio)
from units.audio.unit import AudioUnit

if __name__ == "__main__":
    AudioUnit.main()
