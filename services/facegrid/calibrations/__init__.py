"""Committed similarity calibrations, one JSON file per embedding model version."""
