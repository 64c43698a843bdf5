"""The fast lane's property tests: fewer generated examples, no deadlines.

`pytest -m "not slow"` is the fast lane (README, Contributing). Besides leaving
out the tests marked slow, it runs each property test on at most
``FAST_LANE_EXAMPLES`` generated examples: a quick check while working. The
full run (`python -m pytest`, which CI runs) keeps every test's own counts.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

FAST_LANE_EXAMPLES = 10
PROFILE = "fast-lane"

settings.register_profile(PROFILE, max_examples=FAST_LANE_EXAMPLES, deadline=None)


def is_fast_lane(config: pytest.Config, items: list[pytest.Item]) -> bool:
    """After `-m` deselected: an expression that names `slow` and left no slow test.

    A Hypothesis profile chosen on the command line (`--hypothesis-profile=default`,
    say) turns the lane's example counts off.
    """
    markexpr = config.getoption("markexpr", "") or ""
    return ("slow" in markexpr and not config.getoption("hypothesis_profile", None)
            and not any(item.get_closest_marker("slow") for item in items))


def use_fast_lane_examples(items: list[pytest.Item]) -> None:
    settings.load_profile(PROFILE)  # property tests that set no example count
    for item in items:
        test = getattr(item, "obj", None)
        test = getattr(test, "__func__", test)  # a method: its function holds the settings
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if (getattr(test, "is_hypothesis_test", False) and isinstance(own, settings)
                and own.max_examples > FAST_LANE_EXAMPLES):
            # Hypothesis reads a test's settings from this attribute when the test runs
            # (an explicit count in a settings decorator wins over any profile).
            # tests/project/test_test_suite.py checks both lanes' counts.
            test._hypothesis_internal_use_settings = settings(
                own, max_examples=FAST_LANE_EXAMPLES, deadline=None)
