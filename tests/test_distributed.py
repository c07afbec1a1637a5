"""pipeline.distributed: which share of the work a process takes. Process groups themselves run in
test_scaleout_extract.py and test_scaleout_train.py (torchrun, gloo); these are the rules without one."""

from __future__ import annotations

import pytest

from pipeline.distributed import Ranks, timeout_s
from pipeline.errors import ConfigError


def test_a_single_process_takes_everything():
    ranks = Ranks.single()
    assert (ranks.rank, ranks.world, ranks.group, ranks.is_main, ranks.reports, ranks.label) == (0, 1, False, True, True, "")
    assert ranks.deal([5, 1, 3]) == [5, 1, 3]
    assert ranks.deal_shards([0, 2, 7]) == [0, 2, 7]
    assert ranks.broadcast("x") == "x"
    assert ranks.gather(3) == [3]
    assert ranks.device("auto") == "auto"  # no group: the device is left as asked
    ranks.barrier()
    ranks.check(None, "nothing")
    with pytest.raises(KeyError):
        ranks.check(KeyError("mine"), "a step")  # its own error, re-raised


@pytest.mark.parametrize(("spec", "rank", "world"), [("1/1", 0, 1), ("2/4", 1, 4), (" 4 / 4 ", 3, 4)])
def test_parts_are_numbered_from_one_as_job_arrays_number_them(spec, rank, world):
    ranks = Ranks.from_part(spec)
    assert (ranks.rank, ranks.world, ranks.group) == (rank, world, False)
    assert ranks.reports  # every part reports its own share


@pytest.mark.parametrize("spec", ["0/4", "5/4", "2", "a/b", "1/0", "-1/2"])
def test_a_bad_part_is_one_line(spec):
    with pytest.raises(ConfigError, match=r"--part takes i/n with 1 <= i <= n"):
        Ranks.from_part(spec)


def test_parts_take_shards_by_number_whenever_they_read_the_list():
    """Part i of n takes shards k with k mod n = i - 1, from whatever is still missing when it starts,
    so two parts never take the same shard and together they take all of them."""
    missing_early, missing_late = list(range(10)), [1, 3, 4, 8, 9]
    first, second = Ranks.from_part("1/2"), Ranks.from_part("2/2")
    assert first.deal_shards(missing_early) == [0, 2, 4, 6, 8]
    assert second.deal_shards(missing_late) == [1, 3, 9]
    assert first.label == "part 1/2"


def test_part_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun the ranks already share the work"):
        Ranks.from_options("1/2")


def test_world_size_without_torchrun_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but the process group cannot start.*launch with torchrun"):
        Ranks.from_environment()


def test_a_group_of_one_is_a_single_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Ranks.from_environment() == Ranks.single()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="must be integers"):
        Ranks.from_environment()


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SSVT_DIST_TIMEOUT", raising=False)
    assert timeout_s() == 6 * 3600
    monkeypatch.setenv("SSVT_DIST_TIMEOUT", "90")
    assert timeout_s() == 90
    for bad in ("0", "soon"):
        monkeypatch.setenv("SSVT_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="SSVT_DIST_TIMEOUT"):
            timeout_s()
