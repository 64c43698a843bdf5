"""Helpers shared by the tests (never a test module: nothing here is collected)."""
