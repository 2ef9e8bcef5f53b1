"""The tests' own helper ``distributed_spawn.run_ranks_in_folder_once`` under pytest-xdist (no ranks spawned:
``run_ranks`` stands in)."""

import pytest

import distributed_spawn


class _Factory:
    """A ``tmp_path_factory`` of one xdist worker: its base folder inside the session's shared one."""

    def __init__(self, base):
        self.base = base

    def getbasetemp(self):
        return self.base


def test_a_failed_spawn_fails_every_workers_tests_with_the_ranks_error(tmp_path, monkeypatch):
    """The second worker to take the lock made work/ again (FileExistsError), hiding the ranks' error."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    spawned = []

    def failing(*args, **kwargs):
        spawned.append(1)
        raise RuntimeError("the ranks' own error")
    monkeypatch.setattr(distributed_spawn, "run_ranks", failing)
    for worker in ("gw0", "gw1"):
        (tmp_path / worker).mkdir()
        with pytest.raises(RuntimeError, match="the ranks' own error"):
            distributed_spawn.run_ranks_in_folder_once("case", lambda folder: None, None, 2,
                                                       _Factory(tmp_path / worker))
    assert spawned == [1]                       # spawned once: the second worker is told, not run again
