from units.asr.unit import AsrUnit

if __name__ == "__main__":
    AsrUnit.main()
