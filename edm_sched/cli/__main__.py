"""``python -m edm_sched.cli``: the same as the ``edm-sched`` command."""

import sys

from edm_sched.cli.app import main

sys.exit(main())
