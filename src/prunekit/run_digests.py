"""What a run records of what it started from: SHA-256 digests of a checkpoint file and of
tensors, the config.toml keys that fingerprint a Python run's weights, data and code (and which of
them an older prunekit's config lacks), and the refusals naming code whose digest differs."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces (a checkpoint a run starts from, recorded to tell
    later whether it changed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def tensors_sha256(named) -> str:
    """SHA-256 of (name, tensor) pairs: each name, dtype, shape and the bytes of its values, in
    the order given (a model's ``state_dict().items()``: the weights a Python run starts from, as
    ``checkpoint_sha256`` is for the command line's file). Read one tensor at a time, on the CPU."""
    import torch
    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        if t.is_sparse:
            t = t.to_dense()
        if t.is_quantized:
            t = t.int_repr()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        digest.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))     # no copy
    return digest.hexdigest()


# The keys of a Python run's config.toml that fingerprint what it started from (recipe spelling).
# A folder written before prunekit recorded them has none: it is carried on, with a warning.
# ``data-sha256``: the data's contents where they can be hashed exactly (``api.data_identity``);
# ``data-form``: what holds them, absent for (X, Y) tensors (a folder of an older prunekit recorded
# ``data-sha256`` for those only, and for a loader ``data-samples`` alone).
FINGERPRINT_KEYS = ("weights-sha256", "data-sha256", "data-samples", "data-form")
# Recorded since: ``eval_data`` as ``data`` is (``eval-data-sha256``, ``eval-data-form``,
# ``eval-data-samples``) and the batch size the data is read in (``batch-size``, in every such
# config): a config without ``batch-size`` is an older prunekit's, carried on with a warning.
EVAL_BATCH_KEYS = ("eval-data-sha256", "eval-data-form", "eval-data-samples", "batch-size")


# Recorded since: a fingerprint of the code the user hands ``prunekit.prune`` (``api._code_fingerprints``):
# ``method-fingerprint`` in every such config ("built-in" for prunekit's own methods), ``loss-fingerprint``
# and ``<option>-fingerprint`` (``importance-fingerprint``) where given; a value starting with
# ``UNCHECKED`` records one that could not be hashed faithfully. A config without
# ``method-fingerprint`` is an older prunekit's, carried on with a warning. A ``-fingerprint`` line ends
# in a comment naming what it was taken of (not "built-in": ``api._config_text``); comments are no part
# of the run (``same_values``).
CODE_MARK = "method-fingerprint"
UNCHECKED = "unchecked: "


def _code_key(key: str) -> bool:
    return key.endswith("-fingerprint")


# The comment that config.toml's ``-fingerprint`` lines start under (``api.CODE_COMMENT``), written
# since prunekit took a code digest by its present rule (a function's docstring left out, a loss
# module's train/eval mode in): a config with digests but without it is an older prunekit's, its
# digests taken by the earlier rule, which a digest of the same code now need not match.
CODE_RULE_MARK = "# *-fingerprint:"


def _earlier_digests(old: str, before: dict, after: dict, keys: list[str]) -> list[str]:
    """Of ``keys`` (what differs), the code digests that config ``old`` (parsed: ``before``) took by
    the earlier rule (``CODE_RULE_MARK``) and this call's (``after``) by the present one: both
    digests, so whether the code is the same cannot be told. Empty where anything else differs."""
    if CODE_RULE_MARK in old or not keys:
        return []
    digest = lambda value: isinstance(value, str) and value != "built-in" and not value.startswith(UNCHECKED)
    if all(_code_key(k) and digest(before.get(k)) and digest(after.get(k)) for k in keys):
        return keys
    return []


def earlier_rule(folder_path, keys: list[str]) -> str:
    """The refusal of a run folder of an older prunekit whose code digests (``keys``) differ from this
    call's: taken by another rule, they cannot tell whether the code is the same, and carrying the
    run on could hand back a result of other code."""
    args = ", ".join(f"{k[:-len('-fingerprint')].replace('-', '_')}=" for k in keys)
    return (f"{folder_path} holds a run of an older prunekit, which took the digest of its {args} by an earlier "
            "rule (this version leaves out a function's docstring and counts a loss module's train/eval mode), so "
            "whether that code is the same as this call's cannot be told: clear that run and run it anew "
            "(force=True), or pick another out")


def _before_code(config: dict) -> bool:
    """Whether a Python run's config was written before prunekit fingerprinted the code it is given."""
    return CODE_MARK not in config


def other_code(folder_path, before: dict, after: dict, keys: list[str], detail: dict | None = None) -> str:
    """The refusal of a Python run folder whose run was made with other code (``keys``: the
    ``-fingerprint`` keys, and ``loss``, that differ), naming each argument and the way out, and
    where the code differs (``detail``: ``{key: [place, ...]}``, ``api._code_detail``) when known."""
    said = []
    for key in keys:
        if key == "loss-fingerprint" and "loss" in keys:        # another class or function: said by its name
            continue
        arg = "loss" if key == "loss" else key[:-len("-fingerprint")].replace("-", "_")
        if key not in before:
            said.append(f"{arg}= (that run was made without one)")
        elif key not in after:
            said.append(f"{arg}= (that run was made with one, this call gives none)")
        elif arg == "method":
            said.append(f"method= ({before.get('method')!r}: its run function, options or defaults are not "
                        "the ones that run was made with)")
        elif key == "loss":
            said.append(f"loss= ({before[key]}, now {after[key]})")
        elif (detail or {}).get(key):
            said.append(f"{arg}= ({key} differs in {', '.join(detail[key])})")
        else:
            said.append(f"{arg}= ({key} differs: its code or state is not the one that run was made with)")
    return (f"{folder_path} holds another run, made with another {'; another '.join(said)}: pass what that run "
            "was made with, pick another out, or clear that run first (force=True)")


def _before_eval_batch(config: dict) -> bool:
    """Whether a Python run's config was written before prunekit recorded its eval_data and batch size."""
    return "batch-size" not in config


def _data_form(config: dict) -> str:
    """The form of the data a Python run's config records: its ``data-form``, else (X, Y) tensors
    where it records ``data-sha256``, else a loader (an older prunekit recorded no form)."""
    return config.get("data-form") or ("(X, Y) tensors" if "data-sha256" in config else "a loader")


def _counted_only(config: dict) -> bool:
    """Whether a Python run's config records its data by sample count only (an older prunekit's
    loader run: ``data-samples``, no ``data-sha256`` or ``data-form``)."""
    return "weights-sha256" in config and "data-sha256" not in config and "data-form" not in config


def _fingerprinted(old: str) -> bool:
    """Whether config ``old`` records a fingerprint of what its run started from (any of
    ``FINGERPRINT_KEYS``; a Python run's of an older version records none)."""
    try:
        return bool(set(FINGERPRINT_KEYS) & tomllib.loads(old).keys())
    except tomllib.TOMLDecodeError:
        return True
