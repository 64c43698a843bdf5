"""Tools for testing and benchmarking edm-sched; not imported by the library itself."""
