"""What crosses the cut: the codec (Packet <-> Flower ArrayRecord, the one place bytes are
counted), their sizes, the AWGN channel and the traffic ledger."""
