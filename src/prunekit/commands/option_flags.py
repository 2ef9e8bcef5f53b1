"""Command-line flags of the method options, made from their one declaration.

Every field of a method's options class (``methods.METHODS``) and of ``GradualOptions`` that has
a help line here becomes a flag ``--field-name`` whose type and choices come from the field's
constraint. A flag's default is None (not given): the request then takes the method's default,
and refuses a flag the chosen method does not take, naming it.
"""

from __future__ import annotations

import argparse

from ..methods import METHODS
from ..options import Flag, Integer, IntegerOrAuto, Memory, OneOf, Real, Shares
from ..recipes import int_or_auto
from ..pipelines.gradual import GradualOptions

# The words on the command line; what each option means is in its options class.
HELP = {
    "importance": None,      # a Python function: not on the command line
    "fisher_samples": "gradient rows n (default 1000; falcon++ 500 per stage, or 1000 where --stages auto picks "
                      "its thorough schedule), or auto: the largest n <= 1000 that fits --max-memory and the training data",
    "fisher_dtype": "storage of the gradient matrix (default float32); products accumulate in float32",
    "max_memory": "refuse a request whose estimated peak exceeds this, e.g. 16G, 1.5GiB or 500MB "
                  "(default: the memory available less a margin)",
    "fisher_batch": "samples averaged per row m (default 1: per-sample)",
    "fisher_bn": "BatchNorm in the gradient rows: frozen (running statistics, default) or batch (each "
                 "mini-batch row on its own statistics, as after recalibration; needs --fisher-batch >= 2)",
    "fisher_kind": "model (draws of the model's own Fisher: gradients at random output directions of the "
                   "predictive covariance; the default loss), empirical (gradients at the data's labels), or "
                   "auto (default: model for per-sample rows under the default loss, else empirical)",
    "support_score": "falcon: what the ILP keeps most of: magnitude (w², default) or saliency "
                     "(diag(XᵀX/n + λ)·w², the quadratic model's cost of removing each weight alone)",
    "layer_search": "magnitude-flops, falcon, falcon++: trials of the per-layer allocation search judged by the "
                    "loss after BatchNorm recalibration on held training batches (0: off), or auto: 100 trials "
                    "where the searches' forward passes total at most 1e11 MACs and their solves 5e7 trials x "
                    "weights (a network of MLPNet's size), else off (default: auto for falcon and falcon++, 0 "
                    "for magnitude-flops)",
    "layer_search_mode": "falcon++: where the layer search runs: ahead (every stage, judged at the final budget; "
                         "default), stage (every stage, judged at its own budget) or first (once, on the dense "
                         "model at the final budget; later stages keep its multipliers)",
    "layer_search_refine": "falcon++ with --layer-search-mode first: trials of a second search at the last stage, "
                           "from the first stage's multipliers (default 0)",
    "ridge": "absolute ridge λ > 0 of the quadratic model (the papers' setting; default: see --relative-ridge)",
    "relative_ridge": "λ as a multiple (> 0) of the mean Fisher diagonal, used without --ridge (default 0.1)",
    "stages": "pruning stages, >= 1 and at most 100 (default: chita/falcon 1, chita++ 15, falcon++ auto: 15 stages "
              "of 1,000 rows on fresh images where the layer search over them is cheap, else 5)",
    "schedule": "kept share per stage (default poly)",
    "revive": "let weights pruned in earlier stages come back",
    "fresh_samples": "each stage's gradient rows from training images the earlier stages did not use "
                     "(default: the same first n images at every stage)",
    "solver": "chita: iht (IHT + backsolve, default) or backsolve (magnitude + backsolve); "
              "falcon: dfo (first-order method, default) or magnitude (ILP on w², backsolve)",
    "first_order": "add the loss gradient as the linear term of the quadratic model",
    "final_pick": "multi-stage: judge (default: end with the last stage's result or stage 1's one-shot solution at "
                  "the final budget, whichever has the lower loss on held training batches after BatchNorm "
                  "re-estimation) or last (the last stage's result)",
    "block_size": "backsolve in blocks of this many weights (large models)",
    "obs_block_size": "woodfisher: size of the inverse Fisher's diagonal blocks (default 128)",
    "events": "gradual: prune events, >= 1 and at most 100 (default 4)",
    "event_schedule": "gradual: kept share per event, poly | exp | linear | const (default poly)",
    "start_keep": "gradual: share kept before the first event's schedule point, 0-1 (default 0.9)",
    "epochs_per_event": "gradual: fine-tuning epochs after each event but the last (default 1)",
    "final_epochs": "gradual: fine-tuning epochs after the last event (default 2)",
    "lr": "gradual: peak learning rate (> 0) of each cosine cycle (default 0.01); taper: SGD rate of the weights",
    "gate_batches": "autobot: gate-training batches (default 200)",
    "gate_bn": "autobot: BatchNorm while the gates train: frozen (running statistics, the paper's frozen "
               "network; default) or batch (each batch's own statistics, as after recalibration: better at "
               "tight budgets, see docs/benchmarks.md)",
    "gate_batch_size": "batch size for gate training and fine-tuning (default 64)",
    "beta": "autobot: weight of the FLOP loss (default 6)",
    "gamma": "weight of the 0/1 polarization loss (autobot 0.4, taper 0.1)",
    "gate_lr": "Adam learning rate of the gates (autobot 0.6, taper 0.1)",
    "taper_epochs": "taper: planned length in epochs (default 4)",
    "max_taper_rate": "taper: most dense-MAC share the budget may fall per epoch (default 2x the planned rate)",
    "taper_distill": "taper: weight of the dense model's softened outputs in the loss its weights and gates "
                     "train on while the budget tapers, 0-1 (default 0: labels only)",
    "taper_temperature": "taper: temperature of those outputs (default 1: the task loss stays on cross-entropy's "
                         "scale, which the constraint's multiplier is set for)",
    "snapshots": "taper: also save models at these MAC shares (e.g. 0.7 0.5 0.3), from the same run",
    "depth_flops": "autobot, taper: remove whole blocks first, down to this share of the dense MACs (above "
                   "--flops); the method thins channels of the rest (fewer, wider layers run faster)",
    "depth_batches": "autobot, taper with --depth-flops: training batches that score each block (default 4)",
    "depth_per": "autobot, taper with --depth-flops: a block's loss rise is weighed per MAC it saves (macs, "
                 "default) or per second of its forward time measured here (time: slow thin blocks go first)",
    "structured_flops": "hybrid: share of the dense MACs the channel phase keeps (default 0.5); FALCON prunes "
                        "single weights from there to --flops",
    "final_temperature": "taper: gate temperature at the last budget, annealed from 1 (default 0.05; 1: none)",
    "settled_share": "taper: cut only when this share of the gates is near 0 or 1 (default 0.98)",
    "max_hold_steps": "taper: cut anyway after this many steps at a budget (default 200)",
    "finetune_epochs": "fine-tune the shrunk model(s) this many epochs (default 0)",
    "finetune_lr": "peak SGD learning rate of the fine-tune (default 0.01)",
    "finetune_distill": "weight of the dense model's softened outputs in the fine-tune's loss, 0-1 (autobot and hybrid 0.9; "
                        "taper and --gradual 0: labels only)",
    "finetune_temperature": "temperature of those softened outputs (default 4)",
    "residual_channels": "residual streams (block outputs joined by an add; an option-A ResNet's through its "
                         "zero-pad shortcuts): prune them as one group each (prune, default) or keep them at full "
                         "width, pruning inside blocks only (keep)",
    "reconstruct_batches": "after the channel cut, re-fit each Conv/Linear of the shrunk model, in forward order, to "
                           "the dense model's outputs of that layer on this many training batches (ridge least "
                           "squares that see BatchNorm re-estimation; default 0: off)",
    "reconstruct_ridge": "ridge of that least squares as a multiple of the mean diagonal of XᵀX (default 0.001)",
    "refit_batches": "weights methods, one shot or multi-stage: after pruning, re-fit each pruned Conv/Linear's kept "
                     "weights to the dense layer's outputs on this many training batches, in forward order (least "
                     "squares, centred before a BatchNorm), 0: off, or auto: the first batches holding 1,024 "
                     "samples, fewer where memory cannot hold both networks' activations of them at once "
                     "(default: auto for chita, chita++, woodfisher, falcon and falcon++; 0 for the magnitude "
                     "methods and the hybrid)",
    "refit_ridge": "ridge of that least squares as a multiple (> 0) of the mean diagonal of XᵀX (default 0.001)",
    "channel_multiple": "keep a multiple of this many channels in every group (default 1: exact counts; "
                        "8 measured no faster on ResNet-56, see docs/benchmarks.md)",
}

GROUPS = {"weights": ("options of the weights methods",
                      "--refit-batches and --refit-ridge: every weights method (magnitude, magnitude-uniform, "
                      "magnitude-flops, chita, chita++, woodfisher, falcon, falcon++); --layer-search: "
                      "magnitude-flops, falcon, falcon++; the others: the quadratic-model methods (chita, "
                      "chita++, woodfisher, falcon, falcon++), each the ones it takes (a method refuses an option "
                      "it does not take, naming those it does). The hybrid's FALCON phase takes falcon's."),
          "gradual": ("gradual pruning (--gradual: prune events on the schedule, fine-tuning in between)", None),
          "channels": ("options of the channel methods (autobot, taper, hybrid): remove whole channels to a "
                       "--flops budget", None)}


def _option_classes() -> dict[str, list[type]]:
    classes: dict[str, list[type]] = {"weights": [], "gradual": [GradualOptions], "channels": []}
    for method in METHODS.values():
        if method.options not in classes[method.family]:
            classes[method.family].append(method.options)
    return classes


def _argument(rule) -> dict:
    if isinstance(rule, Flag):
        return {"action": "store_true", "default": None}
    if isinstance(rule, OneOf):
        return {"choices": rule.choices}
    if isinstance(rule, IntegerOrAuto):
        return {"type": int_or_auto}
    if isinstance(rule, Memory):
        return {"type": str}
    if isinstance(rule, Integer):
        return {"type": int}
    if isinstance(rule, Real):
        return {"type": float}
    if isinstance(rule, Shares):
        return {"type": share, "nargs": "+"}
    raise TypeError(f"no flag for {rule!r}")


def share(text: str) -> float:
    """A share as 0.7 or 70% (as --flops takes it)."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (0.7 or 70%)") from None


def option_names() -> list[str]:
    """Every option name that has a flag."""
    names = []
    for classes in _option_classes().values():
        for cls in classes:
            names += [n for n in cls.names() if HELP.get(n) and n not in names]
    return names


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per family, a flag per option (shared options appear once)."""
    added: set[str] = set()
    for family, classes in _option_classes().items():
        group = parser.add_argument_group(*GROUPS[family])
        if family == "gradual":
            group.add_argument("--gradual", action="store_true", help="prune gradually with the method at each event")
        for cls in classes:
            for name in cls.names():
                if name in added or not HELP.get(name):
                    continue
                added.add(name)
                rules = [c.constraints[name] for cs in _option_classes().values() for c in cs if name in c.constraints]
                # a whole number for one method and "auto" allowed by another: the request checks which
                spec = _argument(next((rule for rule in rules if isinstance(rule, IntegerOrAuto)), rules[0]))
                if "choices" in spec:        # e.g. solver: chita's and falcon's, the request checks which
                    spec["choices"] = tuple(dict.fromkeys(c for rule in rules for c in rule.choices))
                group.add_argument("--" + name.replace("_", "-"), dest=name, help=HELP[name], **spec)


OPTION_NAMES = option_names()
