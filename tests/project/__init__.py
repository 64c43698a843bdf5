"""The house: docs, layers, packaging, monitoring assets."""
