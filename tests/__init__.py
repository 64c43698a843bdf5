"""edm-sched's tests, one folder per layer; shared helpers in tests/support/."""
