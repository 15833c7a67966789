from units.tts.unit import TtsUnit

if __name__ == "__main__":
    TtsUnit.main()
