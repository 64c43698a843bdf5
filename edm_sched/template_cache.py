"""The dispatcher's cache of task templates: least recently used out, bounded in size.

A dispatcher renders each claimed subtask with its task's template (subject,
bodies, headers), read from ``edm.templates`` the first time one of the task's
subtasks is claimed. A fair claim cycles through every task with work, so the
cache must hold the templates of every task in the rotation or it reads them
again on every claim; and it must be bounded, because a template's bodies can
be large. Both bounds are here: at most ``max_tasks`` tasks and ``max_bytes``
of template text, least recently used tasks leaving first.

The templates a claim needs are returned to it (:meth:`TemplateCache.lookup`),
and :meth:`TemplateCache.trim` never evicts those: a claim's messages cannot
lose their template between the read and the render, whatever the bounds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from edm_sched.rendering import TemplateRow

TemplatesOfTask = dict[int, TemplateRow]
"""One task's templates by ``template_idx``."""

ROW_OVERHEAD = 400  # bytes a TemplateRow costs beyond its text (objects, dict slots)


def template_size(row: TemplateRow) -> int:
    """Bytes the cache counts for ``row``: its text (one byte per character, a lower
    bound for non-ASCII text) and a fixed overhead."""
    text = (row.subject, row.body_text, row.body_html, row.from_name, row.reply_to)
    return (ROW_OVERHEAD + sum(len(s) for s in text if s)
            + sum(len(k) + len(str(v)) for k, v in row.headers))


class TemplateCache:
    """Templates by task, least recently used first out beyond ``max_tasks`` tasks or
    ``max_bytes`` bytes (:func:`template_size`)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_tasks: int = 100_000) -> None:
        if max_bytes < 0 or max_tasks < 0:
            raise ValueError("max_bytes and max_tasks must be >= 0")
        self.max_bytes, self.max_tasks = max_bytes, max_tasks
        self._tasks: OrderedDict[int, tuple[TemplatesOfTask, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def lookup(self, task_ids: Iterable[int]) -> tuple[dict[int, TemplatesOfTask], list[int]]:
        """The cached templates of ``task_ids`` (now the most recently used) and the
        ids of the tasks not cached."""
        found: dict[int, TemplatesOfTask] = {}
        missing: list[int] = []
        for task_id in task_ids:
            entry = self._tasks.get(task_id)
            if entry is None:
                missing.append(task_id)
            else:
                self._tasks.move_to_end(task_id)
                found[task_id] = entry[0]
        return found, missing

    def add(self, task_id: int, idx: int, row: TemplateRow) -> TemplatesOfTask:
        """Cache ``row`` as template ``idx`` of ``task_id`` (now the most recently used);
        returns the task's templates. The cache may exceed its bounds until the next
        :meth:`trim`."""
        templates, size = self._tasks.pop(task_id, ({}, 0))
        old = templates.get(idx)
        delta = template_size(row) - (template_size(old) if old is not None else 0)
        templates[idx] = row
        self._tasks[task_id] = (templates, size + delta)
        self.bytes += delta
        return templates

    def trim(self, keep: Iterable[int] = ()) -> int:
        """Evict least recently used tasks, never one in ``keep``, until the cache is
        within its bounds (or holds only tasks in ``keep``); returns how many left."""
        kept = set(keep)
        evicted = 0
        for task_id in list(self._tasks):
            if len(self._tasks) <= self.max_tasks and self.bytes <= self.max_bytes:
                break
            if task_id in kept:
                continue
            _, size = self._tasks.pop(task_id)
            self.bytes -= size
            evicted += 1
        return evicted


__all__ = ["TemplateCache", "TemplatesOfTask", "template_size"]
