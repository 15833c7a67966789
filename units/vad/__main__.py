from units.vad.unit import VadUnit

if __name__ == "__main__":
    VadUnit.main()
