"""Test servers and helpers for hosts and for edm-sched's own tests and benchmarks.

Not part of the runtime: nothing outside ``edm_sched.testing`` and
``edm_sched.demo`` imports these modules. ``smtp_sink`` needs the ``demo``
extra (aiosmtpd); ``faulty_smtp`` only the standard library.
"""
