"""Helpers shared by every test tier (import as ``tests.support.<module>``); no tests and no fixtures live here."""
