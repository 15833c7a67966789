import core.notls  # noqa: F401  (before anything imports asyncio)
from units.kws.unit import KwsUnit

if __name__ == "__main__":
    KwsUnit.main()
