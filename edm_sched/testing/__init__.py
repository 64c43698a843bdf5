"""Test servers for hosts and for edm-sched's own tests (the ``demo`` extra).

Not part of the runtime: nothing outside ``edm_sched.testing`` and
``edm_sched.demo`` imports these modules.
"""
