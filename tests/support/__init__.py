"""Helpers shared by the test tiers (imported as `support.*`; tests/ is on pytest's pythonpath)."""
