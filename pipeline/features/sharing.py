"""Sharing one extraction among processes: the store every rank opens, and rank 0's progress of all.

Usage (inside :func:`pipeline.features.extract.extract`)::

    store = shared_store(out, lambda: open_or_create(out, items, cfg, backbone, overwrite), ranks)
    tally = RunProgress(store, missing, mine, summary, progress, poll=ranks.group)
    ...                                   # tally.report() after each shard this process writes
    tally.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.cache.names import StorePath
from pipeline.cache.store import FeatureStore
from pipeline.distributed import Ranks
from pipeline.errors import StoreError

if TYPE_CHECKING:
    from pipeline.features.extract import ExtractSummary

log = logging.getLogger(__name__)

#: Called with (images done so far, images to do in this run).
Progress = Callable[[int, int], None]


def shared_store(path: StorePath, prepare: Callable[[], FeatureStore], ranks: Ranks) -> FeatureStore:
    """The store at ``path`` open for writing in every process. ``prepare`` resumes or creates it
    (:func:`pipeline.features.extract.open_or_create`): under a group rank 0 calls it while the others
    wait, then they open the store; a failure on any rank stops every rank with one line
    (``Ranks.check``) instead of leaving some waiting. A single process or a part of a job array
    calls ``prepare`` itself."""
    if not ranks.group:
        return prepare()
    store, error = None, None
    if ranks.is_main:
        try:
            store = prepare()
        except Exception as exc:  # raised below, on every rank
            error = exc
    ranks.check(error, f"preparing {path}")
    if store is None:
        try:
            store = FeatureStore.open(path, mode="r+")
        except Exception as exc:
            error = exc
    ranks.check(error, f"opening {path} (every rank must see it: is it on a file system all nodes share?)")
    assert store is not None  # set above, or check() raised
    return store


class RunProgress:
    """Calls ``progress(done, total)`` for the images of a run's shards ``todo``: those this process has
    computed (``summary.images_done``, its unfinished shard included) and, with ``poll``, those of the
    other ranks' shards flagged done in the store, read by a thread every second or more (less often
    when reading the flags is slow). So rank 0 shows the progress of the whole group, also while it
    waits for the other ranks at the end, without a collective per shard."""

    def __init__(
        self, store: FeatureStore, todo: list[int], mine: list[int], summary: ExtractSummary, progress: Progress, poll: bool
    ) -> None:
        sizes = {k: store.shard_range(k)[1] - store.shard_range(k)[0] for k in todo}
        self.total = sum(sizes.values())
        own = set(mine)
        self.others = {k: n for k, n in sizes.items() if k not in own}
        self.summary, self.progress, self.flagged = summary, progress, 0
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.report()
        self.thread: threading.Thread | None = None
        if poll and self.others:
            self.reader = FeatureStore.open(store.path)  # its own handle: the main thread keeps store's
            self.thread = threading.Thread(target=self._poll, name="ssvt-progress", daemon=True)
            self.thread.start()

    def report(self, done: int | None = None) -> None:
        with self.lock:  # one call at a time, counts never go back
            self.progress(self.summary.images_done + self.flagged if done is None else done, self.total)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def _poll(self) -> None:
        interval = 1.0
        while not self.stopped.wait(interval):
            began = time.perf_counter()
            try:
                done = self.reader.done_shards()
            except (StoreError, OSError, ValueError) as exc:  # progress only: the run itself goes on
                log.debug("could not read the shard flags for the progress (%s)", exc)
                continue
            self.flagged = sum(n for k, n in self.others.items() if done[k])
            self.report()
            interval = max(1.0, 20 * (time.perf_counter() - began))
