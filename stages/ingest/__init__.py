"""The ingest stage: DECTRIS Stream V2 frames joined with positions into frame batches."""
