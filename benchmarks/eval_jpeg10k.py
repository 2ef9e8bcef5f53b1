"""Accuracy of saved CIFAR-10 models on all 10,000 official test images (lossy JPEG copies).

The exact test subset has 1,017 images (about +-0.8 points, one standard error): too few to
separate methods within a point. ``../shared/data/cifar10/test-jpeg.tar`` holds the whole official
test batch as JPEG (quality about 75), which costs a model 10 to 13 points, and not the same for
every model (a fine-tuned pruned model can lose more than the dense one): its figures are accuracy
on compressed images, about +-0.4 points each.

Reads every row's saved model (the ``saved`` path a ``bench_structured.py`` row writes: the model
after its fine-tune; ``--models-dir``). Those models are not committed: the rows in
``benchmarks/results/structured_s16_*.json`` name models that are not kept, so make the rows anew,
with their models, in a folder of your own (``issue16_rows.sh --results DIR`` runs the same rows
there; over ``benchmarks/results`` it would skip them, their JSON being there), then evaluate those::

    bash benchmarks/issue16_rows.sh --results NEW models50 a     # tp-magnitude-inner, taper-inner, seeds 0-2
    bash benchmarks/issue16_rows.sh --results NEW models50 b     # autobot-inner, tp-magnitude
    bash benchmarks/issue16_rows.sh --results NEW models50 c     # tp-taylor-inner
    python benchmarks/eval_jpeg10k.py --inputs NEW/structured_s16_*_seed0.json \\
        --out NEW/structured_jpeg10k_s16_seed0.json      # committed: benchmarks/results/structured_jpeg10k_s16_seed0.json

(seeds 1 and 2 the same way: ``--inputs NEW/structured_s16_*_seed[12].json``, committed as
``structured_jpeg10k_s16_seed12.json``). An input whose saved model is not there is refused in one
line naming the file and the command that makes it. It reads the dense checkpoint of the rows'
model too, and evaluates each on the
1,017 exact and the 10,000 JPEG test images, and on the JPEG set's two parts: the JPEG copies of the
1,017 exact images (``common.jpeg_copies_of``) and the other 8,983. Exact minus JPEG on the same 1,017 images is what compression costs a
model; the 8,983 are a sample independent of the exact one. The tar is checked against its published md5 and
unpacked once into --cache-dir (nothing under ../shared is written).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import torch

from common import DEFAULT_DATA, JPEG_CACHE, jpeg_copies_of, print_table, refuse, unpacked_jpeg_test, write_json
from prunekit.data import make_loader
from prunekit.loading import load_data, load_model


def correct(model: torch.nn.Module, data, normalization) -> torch.Tensor:
    """(N,) bool: which images of ``data`` (in order) the model classifies right."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x).argmax(1) == y for x, y in make_loader(data, normalization, batch_size=256)])


# The rows of ``issue16_rows.sh models50``, by name: the chain (a, b or c) that makes each.
MODELS50 = {"tp-magnitude-inner_0.5": "a", "taper-inner": "a", "autobot-inner_0.5": "b", "tp-magnitude_0.5": "b",
            "tp-taylor-inner_0.5": "c"}


def making(path: str) -> str:
    """The command that makes result file ``path`` anew with its models, for a refusal: a session-16
    row (``structured_s16_<row>_seed<S>.json``) by ``issue16_rows.sh``, any other by the
    ``bench_structured.py`` settings the file records."""
    name = Path(path).name
    if name.startswith("structured_s16_") and "_seed" in name:
        row = name[len("structured_s16_"):name.rindex("_seed")]
        if row in MODELS50:
            return f"`bash benchmarks/issue16_rows.sh --results NEW models50 {MODELS50[row]}` (into NEW/{name})"
    return (f"`python benchmarks/bench_structured.py --models-dir NEW --out NEW.json` with the settings {path} "
            "records (its \"settings\": methods, budgets, seed ...)")


# what this script reads of a bench_structured.py row, each with the type it needs
ROW_KEYS = {"saved": str, "method": str, "budget": (int, float), "flops_kept": (int, float),
            "accuracy_finetuned": (int, float)}


def not_a_result(payload) -> str | None:
    """What in ``payload`` (a parsed --inputs file) is not what a bench_structured.py result holds and this
    script reads ("no \"rows\"", "row 2 has no \"method\"", ...), or None where it all is."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"
    if not isinstance(payload.get("model"), str):
        return "no \"model\" name"
    if not isinstance(payload.get("settings"), dict) or "seed" not in payload["settings"]:
        return "no \"settings\" with its \"seed\""
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        return "no \"rows\" list" if not isinstance(rows, list) else "no rows"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {i} is a {type(row).__name__}, not an object"
        for key, kind in ROW_KEYS.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                return f"row {i} has no {key!r} ({'a number' if kind is not str else 'a string'})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", "--data", dest="data_dir", default=str(DEFAULT_DATA),
                        help="the shared data folder (--data: the same, as the other scripts name it)")
    parser.add_argument("--inputs", nargs="+", required=True, help="bench_structured.py result files")
    parser.add_argument("--cache-dir", default=JPEG_CACHE, help="where the tar is unpacked")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    payloads = []
    for path in args.inputs:
        try:
            payloads.append((path, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as error:
            refuse(f"--inputs {path} cannot be read as JSON ({type(error).__name__}): pass bench_structured.py result files")
    for path, payload in payloads:
        if (why := not_a_result(payload)) is not None:
            refuse(f"{path} is not a bench_structured.py result ({why}): leave it out, or pass the JSON "
                   "bench_structured.py wrote")
    for path, payload in payloads:      # before the tar is unpacked and any model is read
        for row in payload["rows"]:
            if not Path(row["saved"]).is_file():
                refuse(f"{row['saved']} (the saved model of {path}'s {row['method']} row) is not there: saved models "
                       f"are not committed; make the row anew with its model: {making(path)}, and pass the new JSON")
    models = {p["model"] for _, p in payloads}
    if len(models) != 1:
        refuse(f"--inputs mix models {sorted(models)}: give the rows of one model")
    model_name = models.pop()
    folder = unpacked_jpeg_test(args.data_dir, args.cache_dir)
    jpeg = load_data("imagefolder", folder, "test")
    exact = load_data("cifar10", Path(args.data_dir) / "cifar10", "test")
    print(f"{len(jpeg)} JPEG test images, {len(exact)} exact test images")

    same = jpeg_copies_of(exact, jpeg)

    def scores(loaded) -> dict:
        share = lambda right: 100 * int(right.sum()) / right.numel()     # noqa: E731  (as train.evaluate)
        right = correct(loaded.model, jpeg, loaded.normalization)
        return {"exact1017": share(correct(loaded.model, exact, loaded.normalization)), "jpeg10k": share(right),
                "jpeg_same1017": share(right[same]), "jpeg_other8983": share(right[~same])}

    checkpoint = sorted(glob.glob(f"{args.data_dir}/checkpoints/{model_name}-*.th"))[0]
    rows = [{"file": "-", "method": "dense (no fine-tune)", "budget": 1.0, "seed": None,
             **scores(load_model(model_name, checkpoint))}]
    for path, payload in payloads:
        for row in payload["rows"]:
            start = time.perf_counter()
            got = scores(load_model(model_name, row["saved"]))
            if abs(got["exact1017"] - row["accuracy_finetuned"]) > 1e-6:
                refuse(f"{row['saved']} scores {got['exact1017']:.2f}% on the exact test images, but its "
                                 f"row says {row['accuracy_finetuned']:.2f}%: the saved model is not that row's")
            rows.append({"file": Path(path).name, "method": row["method"], "budget": row["budget"],
                         "seed": payload["settings"]["seed"], "flops_kept": row["flops_kept"],
                         "finetune_distill": row.get("finetune_distill", 0.0), **got})
            print(f"{row['method']} @ {row['budget']:g} seed {payload['settings']['seed']}: exact {got['exact1017']:.2f}%, "
                  f"JPEG {got['jpeg10k']:.2f}% (same 1,017 {got['jpeg_same1017']:.2f}%, other 8,983 "
                  f"{got['jpeg_other8983']:.2f}%) ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(rows, [("method", "method", ">"), ("budget", "budget", ".2f"), ("seed", "seed", "d"),
                       ("exact1017", "exact 1,017 %", ".2f"), ("jpeg10k", "JPEG 10,000 %", ".2f"),
                       ("jpeg_same1017", "JPEG same 1,017 %", ".2f"), ("jpeg_other8983", "JPEG other 8,983 %", ".2f")])
    write_json(args.out, {"model": model_name, "jpeg_images": len(jpeg), "exact_images": len(exact),
                          "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
