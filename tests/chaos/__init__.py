"""Crashes, kills and many processes: the slow lane."""
