from units.audio.unit import AudioUnit

if __name__ == "__main__":
    AudioUnit.main()
