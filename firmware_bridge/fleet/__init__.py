"""The fleet: this board's units offered to other boards over NATS, and theirs reached from here."""
