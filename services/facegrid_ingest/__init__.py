"""The ingest service: watch-lists over many video sources (IngestService)."""
