"""The dispatcher's template cache: least recently used out, bounded by tasks and bytes,
never dropping what the claim at hand needs. No database."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edm_sched.rendering import TemplateRow
from edm_sched.template_cache import ROW_OVERHEAD, TemplateCache, template_size


def row(body: str = "x") -> TemplateRow:
    return TemplateRow(subject="s", body_text=body, body_html=None)


def test_least_recently_used_tasks_leave_first() -> None:
    cache = TemplateCache(max_tasks=2)
    for task_id in (1, 2):
        cache.add(task_id, 0, row())
    cache.lookup([1])  # 2 is now the least recently used
    cache.add(3, 0, row())
    assert cache.trim() == 1
    found, missing = cache.lookup([1, 2, 3])
    assert sorted(found) == [1, 3] and missing == [2]


def test_bytes_bound_the_cache() -> None:
    cache = TemplateCache(max_bytes=3 * (ROW_OVERHEAD + 1 + 1000))
    for task_id in range(5):
        cache.add(task_id, 0, row("b" * 1000))
    cache.trim()
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.lookup(range(5))[1] == [0, 1]


def test_a_claims_tasks_stay_whatever_the_bounds() -> None:
    """The regression: the cache used to be cleared after the claim's templates were
    read into it, and the claim's messages failed with 'task N has no template 0'."""
    cache = TemplateCache(max_bytes=0, max_tasks=0)
    for task_id in (7, 8, 9):
        cache.add(task_id, 0, row())
    assert cache.trim(keep={7, 8, 9}) == 0
    found, missing = cache.lookup([7, 8, 9])
    assert sorted(found) == [7, 8, 9] and missing == []
    assert cache.trim() == 3 and cache.bytes == 0


def test_replacing_a_template_counts_its_new_size_only() -> None:
    cache = TemplateCache()
    cache.add(1, 0, row("a" * 10))
    cache.add(1, 1, row("b" * 20))
    cache.add(1, 0, row("c" * 30))
    assert cache.bytes == template_size(row("b" * 20)) + template_size(row("c" * 30))


def test_negative_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        TemplateCache(max_bytes=-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2), st.integers(0, 300),
                          st.booleans()), max_size=60),
       st.integers(0, 5), st.integers(0, 4000))
def test_the_bounds_and_the_byte_count_hold(
        ops: list[tuple[int, int, int, bool]], max_tasks: int, max_bytes: int) -> None:
    """After any sequence of claims, the cache is within its bounds but for the last
    claim's tasks, its byte count is the sum of its templates' sizes, and it holds the
    last template added for each task it keeps."""
    cache = TemplateCache(max_bytes=max_bytes, max_tasks=max_tasks)
    latest: dict[tuple[int, int], TemplateRow] = {}
    for task_id, idx, size, end_claim in ops:
        r = row("z" * size)
        cache.add(task_id, idx, r)
        latest[(task_id, idx)] = r
        claim = {task_id}
        if end_claim:
            cache.trim(keep=claim)
            within = len(cache) <= max_tasks and cache.bytes <= max_bytes
            assert within or (len(cache) == 1 and task_id in cache)
    found, _ = cache.lookup(range(21))
    assert cache.bytes == sum(template_size(r) for t in found.values() for r in t.values())
    for task_id, templates in found.items():
        for idx, r in templates.items():
            assert latest[(task_id, idx)] is r
