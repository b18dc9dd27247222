"""DECTRIS Stream V2 (SIMPLON 1.8+ CBOR stream): encoding and decoding."""
