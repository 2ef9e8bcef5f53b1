"""``prunekit demo``: prune the bundled MLPNet on the bundled MNIST sample (offline)."""

from __future__ import annotations

from pathlib import Path

from ..data import load_dataset, make_loader
from ..executor import execute
from ..loading import load_model
from ..request import PruneRequest
from .common import emit, show_progress
from .prune import prune_lines

ASSETS = Path(__file__).parent.parent / "assets"
DEMO_METHOD = "chita++"
DEMO_SPARSITY = 0.95
DEMO_OPTIONS = {"stages": 5, "fisher_samples": 500}   # a short CHITA++ run, about a minute on 2 cores


def cmd_demo(args) -> int:
    loaded = load_model("mlpnet", ASSETS / "mlpnet.safetensors")
    test = load_dataset("mnist", ASSETS / "mnist", "test")
    train = load_dataset("mnist", ASSETS / "mnist", "train")
    eval_loader = make_loader(test, loaded.normalization, batch_size=1000)
    train_batches = lambda: make_loader(train, loaded.normalization, batch_size=128, shuffle=True, seed=0)
    if not args.json:
        print(f"prunekit demo: MLPNet 784-40-20-10 (bundled), {len(train)} MNIST training images for "
              f"the method, {len(test)} test images; method {DEMO_METHOD} ({DEMO_OPTIONS['stages']} stages), "
              f"sparsity {DEMO_SPARSITY}")
    plan = PruneRequest(loaded.model, loaded.example_input(), DEMO_METHOD, {"sparsity": DEMO_SPARSITY},
                        exclude=loaded.prune_exclude, options=DEMO_OPTIONS, name=loaded.name).plan()
    record, _, _ = execute(plan, train_batches, eval_loader, progress=show_progress(args))
    emit(args, record, prune_lines(record))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune the bundled MLPNet on bundled MNIST (offline)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
