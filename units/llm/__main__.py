import core.notls  # noqa: F401  (before anything imports asyncio)
from units.llm.unit import LlmUnit

if __name__ == "__main__":
    LlmUnit.main()
