from units.llm.unit import LlmUnit

if __name__ == "__main__":
    LlmUnit.main()
