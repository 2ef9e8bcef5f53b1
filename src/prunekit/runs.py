"""Run folders: one pruning run on disk, readable by people and resumable after any kill.

``executor.execute`` runs a prune of any mode into a folder, resuming from the newest stage,
event or phase checkpoint if there is one (see ``pipelines.stages`` for the protocol).
A folder belongs to one run: ``claim`` refuses another request onto it.

The work is done in one module per job; this module gives their names, as it did before they were
split out, so that ``from prunekit.runs import RunFolder`` and ``runs.claim(...)`` read as ever:

* ``run_folder``: the run folder itself (``RunFolder``; its layout, files and status; whether its
  run finished; the temporaries a killed write left there);
* ``run_digests``: what a run records of what it started from (SHA-256 of files and tensors; the
  fingerprints of a Python run's weights, data and code) and the refusals naming what differs;
* ``run_configs``: whether two run configs ask for the same run (``same_run``, ``by_value``);
* ``run_edits``: whether a folder's config.toml was edited since its run recorded it
  (``edited_since_run``, ``check_*_unchanged``);
* ``run_claims``: the claim of a folder by one run (``claim``, ``check_claim``; on rank 0 under torchrun);
* ``run_checkpoints``: the stage checkpoints a run writes and resumes from (``RunCheckpointer``);
* ``run_measures``: stage measures (``StageMeter``, ``layer_density``).

A name given here is the module's own object, but rebinding it here (a test's monkeypatch) reaches
no caller inside those modules: patch it where it is called (``run_claims.claim`` for
``claim_on_rank_0``'s call, ``run_checkpoints._world_size``).
"""

from .run_checkpoints import EPOCH_PASSES, RunCheckpointer
from .run_claims import check_claim, check_claim_on_rank_0, check_ranks_share, claim, claim_on_rank_0, release_refused
from .run_configs import BUDGET_KEYS, by_value, moved_from, same_run, same_values
from .run_digests import (CODE_MARK, CODE_RULE_MARK, EVAL_BATCH_KEYS, FINGERPRINT_KEYS, UNCHECKED, earlier_rule,
                          file_sha256, other_code, tensors_sha256)
from .run_edits import (TRAINED_AS, EditedConfig, check_asked_as_begun, check_config_unchanged,
                        check_finished_unchanged, check_unfinished_unchanged, edited_since_run, edited_unfinished)
from .run_folder import (ATOMIC_FILES, CODE_SLOTS, CODE_WRITTEN, DATA_RNG, METRICS, RUN_FILES, RUN_PLOTS, RunFolder,
                         finished_note, finished_read_only, finished_read_only_on_rank_0, finished_run, is_run,
                         mark_stopped, only_leftovers, pending_config, remove_stale_temporaries, shown_status,
                         stale_temporaries, stopped_by_divergence)
from .run_measures import StageMeter, layer_density

__all__ = [
    # run_folder
    "ATOMIC_FILES", "CODE_SLOTS", "CODE_WRITTEN", "DATA_RNG", "METRICS", "RUN_FILES", "RUN_PLOTS", "RunFolder",
    "finished_note", "finished_read_only", "finished_read_only_on_rank_0", "finished_run", "is_run", "mark_stopped",
    "only_leftovers", "pending_config", "remove_stale_temporaries", "shown_status", "stale_temporaries",
    "stopped_by_divergence",
    # run_digests
    "CODE_MARK", "CODE_RULE_MARK", "EVAL_BATCH_KEYS", "FINGERPRINT_KEYS", "UNCHECKED", "earlier_rule", "file_sha256",
    "other_code", "tensors_sha256",
    # run_configs
    "BUDGET_KEYS", "by_value", "moved_from", "same_run", "same_values",
    # run_edits
    "TRAINED_AS", "EditedConfig", "check_asked_as_begun", "check_config_unchanged", "check_finished_unchanged",
    "check_unfinished_unchanged", "edited_since_run", "edited_unfinished",
    # run_claims
    "check_claim", "check_claim_on_rank_0", "check_ranks_share", "claim", "claim_on_rank_0", "release_refused",
    # run_checkpoints
    "EPOCH_PASSES", "RunCheckpointer",
    # run_measures
    "StageMeter", "layer_density",
]
