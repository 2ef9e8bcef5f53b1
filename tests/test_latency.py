"""The logic of the latency measurement (not the machine's speed): alternation, warm-up, medians,
and that a load drifting during the measurement does not bias the ratio."""

import pytest
import torch

from prunekit.latency import latency_table, paired_latency


class FakeMachine:
    """A clock and two 'models' whose calls take ``cost x load`` seconds; the load drifts by
    ``drift`` per call (a machine getting busier), so timing all of one model first would bias it."""

    def __init__(self, dense_cost, pruned_cost, drift=0.0, spikes=(), phase=lambda call: 1.0):
        self.now, self.load, self.drift, self.calls = 0.0, 1.0, drift, []
        self.spikes, self.phase = set(spikes), phase       # phase: the load's factor for the n-th call
        self.dense = lambda x: self._run("dense", dense_cost)
        self.pruned = lambda x: self._run("pruned", pruned_cost)

    def clock(self):
        return self.now

    def _run(self, name, cost):
        factor = (50.0 if len(self.calls) in self.spikes else 1.0) * self.phase(len(self.calls))  # a one-off stall
        self.calls.append(name)
        self.now += cost * self.load * factor
        self.load += self.drift


def test_calls_alternate_after_a_warmup_of_both():
    m = FakeMachine(2e-3, 1e-3)
    r = paired_latency(m.dense, m.pruned, None, warmup=3, repeats=5, clock=m.clock)
    assert m.calls == ["dense", "pruned"] * 8
    assert r.dense_ms == pytest.approx(2.0) and r.pruned_ms == pytest.approx(1.0)
    assert r.ratio == pytest.approx(0.5) and r.repeats == 5 and r.warmup == 3


def test_a_drifting_load_does_not_bias_the_ratio():
    # the load doubles over the measurement: dense-then-pruned timing would report ~0.75, not 0.5
    m = FakeMachine(2e-3, 1e-3, drift=1 / 60)
    r = paired_latency(m.dense, m.pruned, None, warmup=0, repeats=30, clock=m.clock)
    assert r.ratio == pytest.approx(0.5, rel=0.02)
    naive = FakeMachine(2e-3, 1e-3, drift=1 / 60)          # all dense runs, then all pruned runs
    for _ in range(30):
        naive.dense(None)
    dense_s = naive.now
    for _ in range(30):
        naive.pruned(None)
    assert (naive.now - dense_s) / dense_s > 0.7              # biased: the reason for pairs


def test_medians_ignore_stalls_and_quartiles_bracket_the_ratio():
    m = FakeMachine(4e-3, 1e-3, spikes={10, 21})          # two calls 50x slower
    r = paired_latency(m.dense, m.pruned, None, warmup=0, repeats=9, clock=m.clock)
    assert r.dense_ms == pytest.approx(4.0) and r.pruned_ms == pytest.approx(1.0)
    assert r.ratio == pytest.approx(0.25) and r.ratio_q1 <= r.ratio <= r.ratio_q3


def test_steady_timings_are_not_noisy():
    m = FakeMachine(2e-3, 1e-3, drift=1 / 600)
    r = paired_latency(m.dense, m.pruned, None, warmup=0, repeats=30, clock=m.clock)
    noise = r.noise()
    assert noise["noisy"] is False and r.as_dict()["noisy"] is False
    assert noise["noise"]["fastest_ratio"] == pytest.approx(0.5, rel=0.01) and noise["noise"]["ratio_spread"] < 0.01


def test_a_machine_switching_between_slow_and_fast_phases_is_noisy():
    # 2 ms or 6 ms by turns of 6 calls: the calls of each model spread by far more than a quarter
    m = FakeMachine(2e-3, 1e-3, phase=lambda call: 3.0 if call // 6 % 2 else 1.0)
    r = paired_latency(m.dense, m.pruned, None, warmup=0, repeats=30, clock=m.clock)
    assert r.noise()["noisy"] is True and r.noise()["noise"]["dense_spread"] > 0.25


def test_a_ratio_with_tight_quartiles_but_off_by_the_load_is_noisy():
    # the same model twice; the dense calls land in a slow phase all but twice: every pair reads 0.33x
    # (quartiles tight), while the fastest calls of each, 1 ms both, say 1x
    m = FakeMachine(1e-3, 1e-3, phase=lambda call: 3.0 if call % 2 == 0 and call > 2 else 1.0)
    r = paired_latency(m.dense, m.pruned, None, warmup=0, repeats=9, clock=m.clock)
    assert r.ratio == pytest.approx(1 / 3) and r.ratio_q3 - r.ratio_q1 < 0.01
    noise = r.noise()
    assert noise["noisy"] is True and noise["noise"]["fastest_ratio"] == pytest.approx(1.0)
    assert noise["noise"]["fastest_gap"] == pytest.approx(2.0)


def test_fewer_than_five_repeats_are_refused():
    m = FakeMachine(1e-3, 1e-3)
    with pytest.raises(ValueError, match="at least 5"):
        paired_latency(m.dense, m.pruned, None, repeats=4, clock=m.clock)


def test_table_has_a_row_per_thread_count_and_batch_and_restores_threads():
    before = torch.get_num_threads()
    dense, pruned = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    rows = latency_table(dense, pruned, (8,), batch_sizes=(1, 3), threads=(1, 2), warmup=1, repeats=5)
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["repeats"] == 5 for r in rows)
    assert all(isinstance(r["noisy"], bool) and r["noise"]["limit"] == 0.25 for r in rows)
    assert torch.get_num_threads() == before


def test_a_batch_size_past_the_memory_is_refused_naming_the_largest_that_fits():
    import re

    from prunekit import latency
    from prunekit.errors import PrunekitError
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    per_sample = 784 * 4 + 3 * 784 * 4          # the input, and 3 x the largest module output (Flatten's)
    room = 1000 * per_sample + 7                # bytes
    latency.check_batch_sizes(net, (1, 28, 28), [1, 64, 1000], available=room)
    with pytest.raises(PrunekitError) as err:
        latency.check_batch_sizes(net, (1, 28, 28), [1, 1001], available=room)
    message = str(err.value)
    assert "\n" not in message and "--batch-sizes 1001" in message, message
    assert re.search(r"the largest batch size that fits is 1000\b", message), message


def test_the_memory_check_defaults_to_the_memory_available(monkeypatch):
    from prunekit import latency, process_memory
    from prunekit.errors import PrunekitError
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    monkeypatch.setattr(process_memory, "available_memory", lambda device: 2 * 2**30)
    latency.check_batch_sizes(net, (1, 28, 28), [10_000])                     # 125 MB of 1.5 GB
    with pytest.raises(PrunekitError, match="lower --batch-sizes"):
        latency.check_batch_sizes(net, (1, 28, 28), [1_000_000])              # 12.5 GB
