"""The host API: input validation, rendering, operations and monitoring."""
