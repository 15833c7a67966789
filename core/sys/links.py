"""The link directory: which downstream tasks receive the outputs published under a source work_id."""
from __future__ import annotations

from collections import defaultdict


class LinkDirectory:
    def __init__(self) -> None:
        self._down: dict[str, set[str]] = defaultdict(set)  # source -> subscribers
        self._up: dict[str, set[str]] = defaultdict(set)  # subscriber -> sources

    def set_subscriptions(self, subscriber: str, sources: list[str]) -> None:
        for source in self._up.pop(subscriber, set()):
            self._down[source].discard(subscriber)
        for source in sources:
            self._down[source].add(subscriber)
            self._up[subscriber].add(source)

    def remove(self, work_id: str) -> set[str]:
        """Forget a task as subscriber and as source; returns the tasks that were subscribed to it."""
        self.set_subscriptions(work_id, [])
        self._up.pop(work_id, None)
        return self._down.pop(work_id, set())

    def subscribers(self, source: str) -> set[str]:
        return self._down.get(source, set())

    def sources(self, subscriber: str) -> set[str]:
        return set(self._up.get(subscriber, set()))

    def clear(self) -> None:
        self._down.clear()
        self._up.clear()
