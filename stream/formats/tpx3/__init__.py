"""Timepix3 (TPX3) data: packet layout, chunk framing, event decoding and frame building."""
