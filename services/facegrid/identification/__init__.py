"""The identification flow shared by the gateway and the ingest service."""
