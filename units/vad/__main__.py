import core.notls  # noqa: F401  (before anything imports asyncio)
from units.vad.unit import VadUnit

if __name__ == "__main__":
    VadUnit.main()
