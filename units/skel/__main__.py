from units.skel.unit import SkelUnit

if __name__ == "__main__":
    SkelUnit.main()
