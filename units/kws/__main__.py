from units.kws.unit import KwsUnit

if __name__ == "__main__":
    KwsUnit.main()
