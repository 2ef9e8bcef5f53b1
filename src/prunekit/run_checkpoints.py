"""A run's stage checkpoints: ``RunCheckpointer`` writes ``checkpoints/stage-NNN.safetensors`` after
each stage, event, epoch or phase, and reads the newest readable one back for a resume (where it
carries on, the state handed to the ``restored`` hook, a changed world size or an older prunekit's
loader passes said)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import PrunekitError, PrunekitWarning, worded_warning
from .pipelines.stages import StageState
from .record import finite as _finite
from .saving import write_tensor_file
from .errors import warn as warn_ours
from .run_edits import _check_same_config
from .run_folder import RunFolder
from .run_measures import _measure_into


# passes over the loader per training epoch this version's checkpoints were written with (recorded
# in each checkpoint's metadata); versions before it recorded none and read their loader twice
EPOCH_PASSES = 1


class RunCheckpointer:
    """A ``StageCheckpointer`` writing ``checkpoints/stage-NNN.safetensors`` in a run folder.

    One file per stage holds the model state (``model/<key>``), the pipeline's own tensors
    (``kept/<key>``), the torch RNG states (``rng/torch``; each GPU's ``rng/cuda/<i>``) and, in the safetensors metadata, the
    stage number and history as JSON (and ``rng``: ``{}``; an older version's held NumPy's and
    ``random``'s states there, read as before and left unused: ``stages.capture_rng``); one atomic write, so a
    file is complete or absent. ``measure(model) -> dict`` (optional) adds measurements (accuracy,
    loss, counts) to the stage's record before it is written; ``on_saved(history)`` is told after
    each write. ``measure_seconds``: the time spent in ``measure`` so far, which pipelines leave
    out of their pruning time.
    """

    def __init__(self, folder: RunFolder, measure: Callable[[nn.Module], dict] | None = None,
                 on_saved: Callable[[list[dict]], None] | None = None, unit: str = "stage"):
        self.folder, self.measure, self.on_saved = folder, measure, on_saved
        self.unit = unit                # a checkpoint in run.log: stage, event (gradual), epoch (train), phase (structured)
        # how a warning over an older folder says to run it anew, in the command line's words (a
        # sweep's run, or ``prune --resume``, which takes no --force, say it otherwise)
        self.redo = "run it anew with --force"
        self.restored_seconds = 0.0     # time the stages restored by ``last`` took in earlier runs
        self.measure_seconds = 0.0
        # run.log's "resuming after stage N from ..." as ``last`` resumes; off where the command's own
        # "resume: ..." line said it already (``train``: one line per resume)
        self.log_resuming = True
        self.announced: str | None = None      # the checkpoint the "resume: ..." line named (resume_point)
        # the world size (torchrun's ranks; 1 alone) of each session whose stages the newest checkpoint
        # carries, this one last, once each time it changed: [2, 1] for a 2-rank run resumed with 1
        self.world_sizes = [_world_size()]
        # told the state ``last`` resumes from, before the pipeline carries on (the executor sets its
        # evaluation replay at the pass an uninterrupted run would read next)
        self.restored: Callable[[StageState], None] | None = None

    def _named(self, state: StageState) -> str:
        """'stage 2'; a phase with what it was: 'phase 3 (finetune, flops 0.5, epoch 1)'."""
        return self._named_at(state.stage, state.history)

    def _named_at(self, stage: int, history: list[dict]) -> str:
        last = history[-1] if self.unit == "phase" and history else {}
        if "phase" not in last:
            return f"{self.unit} {stage}"
        what = [str(last["phase"])] + [f"{k} {last[k]:g}" for k in ("flops", "epoch")
                                       if isinstance(last.get(k), (int, float))]
        return f"{self.unit} {stage} ({', '.join(what)})"

    def resume_point(self) -> str | None:
        """Where a resume carries on, for run.log's one "resume: ..." line: "after stage 2 from
        stage-002.safetensors" (a phase named with what it was), read from the newest checkpoint
        whose header reads (its tensors are read by ``last``); None when there is none. It turns
        ``last``'s own "resuming after ..." line off (``log_resuming``): ``last`` says where it
        resumed only where it had to fall back past a checkpoint that does not read."""
        for path in sorted(self.folder.checkpoints.glob("stage-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata()
                named = self._named_at(int(meta["stage"]), json.loads(meta["history"]))
            except (SafetensorError, KeyError, ValueError, TypeError, OSError):
                continue
            self.log_resuming = False
            self.announced = path.name
            return f"after {named} from {path.name}"
        return None

    def path(self, stage: int) -> Path:
        return self.folder.checkpoints / f"stage-{stage:03d}.safetensors"

    def save(self, state: StageState, model: nn.Module) -> None:
        if self.measure is not None and state.history:
            self.measure_seconds += _measure_into(state.history[-1], self.measure, model)
        if not self.folder.writable:          # another rank writes the checkpoint
            if self.on_saved is not None:
                self.on_saved(state.history)
            return
        tensors = {f"model/{k}": v.contiguous() for k, v in state.model_state.items()}
        tensors.update({f"kept/{k}": v.contiguous() for k, v in state.tensors.items()})
        tensors["rng/torch"] = state.rng["torch"]
        tensors.update({f"rng/cuda/{i}": t for i, t in enumerate(state.rng.get("cuda", []))})
        meta = {"stage": str(state.stage), "history": json.dumps(_finite(state.history)),
                "rng": json.dumps({k: v for k, v in state.rng.items() if k not in ("torch", "cuda")}),
                "extra": json.dumps(_finite(state.extra))}
        if self.folder.config.exists():       # the options the stage ran with: a resume under others is refused
            meta["config"] = self.folder.config_text()
        meta["world_sizes"] = json.dumps(self.world_sizes)
        meta["epoch_passes"] = str(EPOCH_PASSES)      # a resume tells this version's checkpoints from older ones
        write_tensor_file(self.path(state.stage), tensors, meta)
        self.folder.log(f"{self._named(state)} saved to {self.path(state.stage).name}")
        if self.on_saved is not None:
            self.on_saved(state.history)

    def last(self) -> StageState | None:
        """The newest readable checkpoint (a damaged one falls back to the one before); None when
        there is none. Refuses (``PrunekitError``) checkpoints none of which can be read, rather
        than starting the run over on top of them."""
        unreadable = []
        for path in sorted(self.folder.checkpoints.glob("stage-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata()
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                rng = {**json.loads(meta["rng"]), "torch": tensors.pop("rng/torch")}
                cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.split("/")[-1]))
                if cuda:
                    rng["cuda"] = [tensors.pop(k) for k in cuda]
                model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
                kept = {k[len("kept/"):]: v for k, v in tensors.items() if k.startswith("kept/")}
                state = StageState(int(meta["stage"]), model_state, json.loads(meta["history"]), rng,
                                   json.loads(meta.get("extra", "{}")), kept)
            except (SafetensorError, KeyError, ValueError, TypeError, OSError) as err:     # as resume_point's
                self.folder.log(f"skipping unreadable checkpoint {path.name}: {err}")
                unreadable.append(f"{path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                continue
            _check_same_config(self.folder, meta.get("config"), path.name)
            if self.log_resuming or (unreadable and path.name != self.announced):
                self.folder.log(f"resuming after {self._named(state)} from {path.name}")
            if self.folder.echo is not None:        # the console says what run.log says
                self.folder.echo(f"resuming {self.folder.path} after {self._named(state)}")
            self._tell_other_world_size(_world_sizes(meta), path.name)
            self._tell_older_epoch_passes(meta)
            self.restored_seconds = sum(h.get("seconds") or 0.0 for h in state.history)
            if self.restored is not None:
                self.restored(state)
            return state
        if unreadable:
            raise PrunekitError(f"no checkpoint in {self.folder.checkpoints} can be read ({unreadable[0]}): restore "
                                "it, or delete that checkpoints folder to start the run over")
        return None


    def _tell_other_world_size(self, before: list[int] | None, name: str) -> None:
        """Carry on ``world_sizes`` from the checkpoint (``before``; None: written before they were
        kept) and, where this session runs with another world size than the one that wrote it, say
        so in run.log and on stderr (a warning; rank 0 alone, the one that writes the folder): the
        ranks split the rows and sums otherwise, so the result is not the bits an uninterrupted run
        gives, only within the rounding the README documents."""
        if not before:
            return
        now = self.world_sizes[-1]
        self.world_sizes = before + ([now] if before[-1] != now else [])
        if before[-1] == now:
            return
        line = (f"resumed with {now} rank{'s' if now != 1 else ''}; {name} was written with {before[-1]}: the result "
                f"matches an uninterrupted run only within the documented rounding (resume with {before[-1]} "
                f"rank{'s' if before[-1] != 1 else ''} for the same bits)")
        self.folder.log(line)
        warn_ours(PrunekitWarning(line))        # every rank: ``errors.warn`` shows it on rank 0 alone


    def _tell_older_epoch_passes(self, meta: dict) -> None:
        """Where the checkpoint carries loader state or event records (an event, epoch or phase:
        gradual, train, structured) and was written by a prunekit older than ``EPOCH_PASSES`` (no
        ``epoch_passes`` in its metadata: that version read its loader twice per training epoch),
        say so once in run.log and on stderr: carried on, the run's data order is neither
        version's, so its weights match no uninterrupted run. Exact continuation cannot be had."""
        if self.unit not in ("event", "epoch", "phase") or "epoch_passes" in meta:
            return
        def said(fix: str) -> str:
            return (f"{self.folder.path} was written by an older prunekit that read its loader twice per epoch: "
                    "carried on, this run's weights match no uninterrupted run (of either version); "
                    f"{fix} for a reproducible result")
        self.folder.log(said(self.redo))
        warn_ours(worded_warning(said("run it anew with force=True"), said(self.redo)))     # every rank (errors.warn)


def _world_size() -> int:
    """This process's world size: the ranks of its torchrun group, 1 alone."""
    from . import distributed          # (distributed imports the solvers, which import this module's users)
    return distributed.current().size


def _world_sizes(meta: dict) -> list[int] | None:
    """A checkpoint's ``world_sizes`` (its metadata), None where it has none or they are damaged."""
    try:
        sizes = json.loads(meta.get("world_sizes") or "null")
    except ValueError:
        return None
    if not (isinstance(sizes, list) and sizes and all(isinstance(n, int) and n >= 1 for n in sizes)):
        return None
    return sizes
