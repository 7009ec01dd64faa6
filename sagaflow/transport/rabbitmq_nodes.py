"""Which RabbitMQ node to connect to next, and how long to wait before it.

A cluster's nodes go in the URL's host part (``amqp://u:pw@rmq1,rmq2,rmq3/vh``,
split by :func:`sagaflow.config.broker_urls`). A process starts at a node
chosen at random, so that the processes of a deployment spread over the
cluster; when its connection is lost, or an attempt fails, it moves to the
next node at once, and backs off (doubling up to the longest pause) only after
every node of a round has failed. With one node this is the plain back-off.
"""

from __future__ import annotations

import random

from yarl import URL

from sagaflow.config import broker_urls, redact_url
from sagaflow.core.errors import ConfigurationError

__all__ = ["Nodes"]


class Nodes:
    """The broker nodes a transport may connect to, and the pauses between tries.

    Args:
        url: one node's URL, or a cluster's (comma-separated hosts).
        reconnect_delay: the first and the longest pause between attempts.

    Raises:
        ConfigurationError: a node's URL is invalid (a port that is no number,
            say): it would never connect.
    """

    def __init__(self, url: str, reconnect_delay: tuple[float, float]) -> None:
        self.urls = broker_urls(url)
        for node_url in self.urls:
            try:
                URL(node_url)
            except ValueError as exc:
                raise ConfigurationError(f"invalid AMQP URL {redact_url(node_url)}: {exc}") from exc
        self._first, self._longest = reconnect_delay
        self._index = random.randrange(len(self.urls))
        self.backoff = self._first
        """The pause once a whole round of nodes has failed (grows each round)."""
        self._failures = 0  # in a row, across the nodes

    @property
    def url(self) -> str:
        """The node connected to, or tried next."""
        return self.urls[self._index]

    @property
    def redacted(self) -> list[str]:
        """Every node's URL, passwords masked."""
        return [redact_url(url) for url in self.urls]

    def connected(self) -> None:
        """A session ran: the next loss starts a fresh round."""
        self.backoff, self._failures = self._first, 0

    def failed(self) -> None:
        """An attempt or a session failed."""
        self._failures += 1

    @property
    def pause(self) -> float:
        """How long to wait before the next node: short while this round has
        nodes left to try, the back-off once all of them failed."""
        return self.backoff if self._round_over else self._first

    def skip(self) -> None:
        """Go to the next node, leaving the back-off as it is."""
        self._index = (self._index + 1) % len(self.urls)

    def next(self) -> float:
        """Go to the next node; returns the pause to take before trying it."""
        pause = self.pause
        if self._round_over:
            self.backoff = min(self.backoff * 2, self._longest)
        self.skip()
        return pause

    @property
    def _round_over(self) -> bool:
        return self._failures > 0 and self._failures % len(self.urls) == 0
