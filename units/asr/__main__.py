import core.notls  # noqa: F401  (before anything imports asyncio)
from units.asr.unit import AsrUnit

if __name__ == "__main__":
    AsrUnit.main()
