"""Scale out with ``torch.distributed`` (launched by ``torchrun``): the communicator the solvers
use, gradient matrices sharded by columns, and the helpers that keep files and printing on rank 0."""

from .collective import (MachineRefusal, TorchCollective, agree_refusal, barrier_if_alive, check_same_start, current, digest,
                         launcher_watched,
                         disagreeing, early_refusals, init_from_env, is_main_process, launched_by_torchrun,
                         LAUNCHER_GONE, launcher_lost, peer_refused, peers_stopped, say_reported, say_stopped, silent_peers, with_rank_peaks, on_several_machines,
                         print_refusal, ranks_on_this_machine, shutdown)

__all__ = ["MachineRefusal", "launcher_watched", "TorchCollective", "agree_refusal", "barrier_if_alive", "check_same_start", "current", "digest",
           "disagreeing", "early_refusals", "init_from_env", "is_main_process", "launched_by_torchrun", "print_refusal",
           "ranks_on_this_machine", "shutdown", "LAUNCHER_GONE", "launcher_lost", "peer_refused", "peers_stopped", "say_reported", "say_stopped", "silent_peers", "with_rank_peaks", "on_several_machines"]
