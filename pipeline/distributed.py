"""Which share of the work this process does: one process, a rank of a ``torchrun`` process group, or
one part of a job array (``--part i/n``, no process group).

Usage::

    ranks = Ranks.from_environment()          # torchrun sets RANK/WORLD_SIZE/...; else a single process
    ranks = Ranks.from_part("2/4")            # part 2 of 4 (1-based on the command line), no group
    ranks = Ranks.from_options(part)          # --part when given (refused under torchrun), else the above
    mine = ranks.deal(missing_shards)         # this process's share of a list every process agrees on
    mine = ranks.deal_shards(missing_shards)  # by shard number for parts of a job array (timing-free)
    if ranks.is_main: ...                     # rank 0 prints, writes tables and creates stores
    ranks.barrier(); ranks.broadcast(obj); ranks.gather(obj); ranks.close()

The process group comes from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with the backend ``cpu:gloo,cuda:nccl`` when CUDA
is there (objects and control over gloo, gradients over NCCL) and ``gloo`` otherwise. Collectives are
used for control only (who creates a store, which shards are missing, the final summaries), never per
shard, so ranks with uneven work cannot deadlock; the timeout is long (``SSVT_DIST_TIMEOUT`` seconds,
default 6 hours) because a rank with more shards keeps the others waiting at the final barrier.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, RankFailed

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes; ``group`` is True when a torch.distributed
    process group connects them (torchrun), False for a single process or a ``--part`` of a job array."""

    rank: int = 0
    world: int = 1
    group: bool = False
    local_rank: int = 0

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def from_environment(cls) -> Ranks:
        """The torchrun process group when ``WORLD_SIZE`` is set (initialised here if nobody has yet),
        else a single process. A group of one (``torchrun --nproc_per_node=1``) is a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True, int(os.environ.get("LOCAL_RANK", 0)))
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
        except (ValueError, RuntimeError) as exc:  # e.g. WORLD_SIZE set by hand, without MASTER_ADDR/MASTER_PORT
            raise ConfigError(
                f"WORLD_SIZE={world} but the process group cannot start ({exc}); launch with torchrun, "
                "or unset WORLD_SIZE for one process (job arrays: --part I/N)"
            ) from exc
        log.info("rank %d of %d (local rank %d), backend %s", rank, world, local, backend)
        return cls(rank, world, True, local)

    @classmethod
    def from_part(cls, spec: str) -> Ranks:
        """``"i/n"`` (1 <= i <= n): part i of n, as job arrays number them; no process group."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise ConfigError(f"--part takes i/n with 1 <= i <= n (e.g. 1/4 for the first of four parts), got {spec!r}")
        return cls(int(match[1]) - 1, int(match[2]), False)

    @classmethod
    def from_options(cls, part: str | None = None) -> Ranks:
        """:meth:`from_part` when ``part`` is given, else :meth:`from_environment`. ``part`` is refused
        under torchrun (``WORLD_SIZE`` > 1), whose ranks share the work already."""
        if part is None:
            return cls.from_environment()
        if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
            raise ConfigError(
                "--part is for job arrays started without torchrun; under torchrun the ranks already share the work: drop --part"
            )
        return cls.from_part(part)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, writes shared files and creates stores."""
        return self.rank == 0

    @property
    def reports(self) -> bool:
        """Whether this process prints progress and summaries: rank 0 of a group, a single process and
        every part of a job array (each part has a log of its own)."""
        return self.is_main or not self.group

    @property
    def label(self) -> str:
        """``rank 1/4`` or ``part 2/4`` (1-based as typed), or "" for a single process."""
        if self.world == 1:
            return ""
        return f"rank {self.rank}/{self.world}" if self.group else f"part {self.rank + 1}/{self.world}"

    def device(self, spec: str) -> str:
        """``spec`` with ``auto``/``cuda`` pinned to this rank's GPU (``cuda:LOCAL_RANK``) under a group
        on a CUDA machine; anything else as given."""
        if self.group and spec in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return spec

    def deal(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``, round-robin (``items[rank::world]``). Under a group the
        list is rank 0's (broadcast), so every rank deals the same list even if they read it at
        different moments; parts of a job array must pass a list that does not depend on timing."""
        items = list(self.broadcast(list(items)))
        return items[self.rank :: self.world]

    def deal_shards(self, missing: Sequence[int]) -> list[int]:
        """This process's share of the ``missing`` shard numbers. Under a group, rank 0's list dealt
        round robin (:meth:`deal`), so the ranks of a resumed run share what is left evenly. For a part
        of a job array, the shards ``k`` with ``k % world == rank``: that depends on the shard, not on
        the moment a part read the list, so parts started at different times never take the same
        shard. A single process takes them all."""
        if self.group:
            return self.deal(missing)
        return [k for k in missing if k % self.world == self.rank]

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (``obj`` itself without a group)."""
        if not self.group:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
        if not self.group:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is True on every rank: lets all ranks stop together after
        one fails a step that the others wait on (instead of the others hanging at the next barrier)."""
        return all(self.gather(bool(ok)))

    def check(self, error: BaseException | None, what: str) -> None:
        """A sync point after a step every rank tries (``error``: how it failed here, or None): when it
        failed on any rank, every rank raises, the failing ones their own error and the others a
        :class:`RankFailed` naming the first failed rank and its message, so no rank goes on to
        wait for a failed one at a later collective. Without a group: re-raises ``error`` if any."""
        messages = self.gather(None if error is None else str(error) or type(error).__name__)
        if error is not None:
            raise error
        failed = [r for r, message in enumerate(messages) if message is not None]
        if failed:
            raise RankFailed(f"{what} failed on rank {failed[0]} of {self.world}: {messages[failed[0]]}")

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` run by rank 0 of the group alone (e.g. writing a shared file), its result (picklable)
        on every rank; when it raises, every rank raises (:meth:`check`) instead of waiting for it.
        Without a group (one process, or a part of a job array) this process runs ``fn`` itself."""
        result: T | None = None
        error: BaseException | None = None
        if self.is_main or not self.group:
            try:
                result = fn()
            except Exception as exc:  # every rank stops with it
                error = exc
        self.check(error, what)
        return cast(T, self.broadcast(result))

    def close(self) -> None:
        """Leave the process group (if this process joined one)."""
        if self.group and dist.is_initialized():
            dist.destroy_process_group()


def timeout_s() -> float:
    raw = os.environ.get("SSVT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"SSVT_DIST_TIMEOUT is seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"SSVT_DIST_TIMEOUT must be positive, got {raw!r}")
    return value
