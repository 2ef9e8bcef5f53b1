"""The words for a collective that failed on a lost torchrun rank, shared by the command line
(``cli``: its one line, run.log's stop) and the library (``api.lost_rank_refusal``: ``LostRank``)."""

from __future__ import annotations

import re

import torch.distributed


def is_lost_rank(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective failing because another rank died or timed out."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def shortened(text: str, limit: int = 160) -> str:
    """``text`` (torch's error) cut to at most ``limit`` characters at the end of a sentence, else
    of a word (with "..."): never mid-word ("Check the logs of the re")."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    sentence = max(head.rfind(". ", 0, limit), head.rfind("! ", 0, limit), head.rfind("? ", 0, limit),
                   head.rfind("; ", 0, limit))
    if sentence >= limit // 4:
        return text[:sentence + 1].rstrip(";")
    word = text.rfind(" ", 0, limit - 2)
    return (text[:word] if word > 0 else text[:limit - 3]).rstrip(" ,:;") + "..."


def first_line(err: RuntimeError) -> str:
    """A lost rank's torch error, one line (its "[host:port]" prefix dropped), cut short (``shortened``)."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
    return shortened(first)


def lost_ranks_words(lost: list[int]) -> str:
    """What happened, for ranks known lost while this one computed (``silent_peers``): "rank 1 was lost: ..."."""
    if len(lost) == 1:
        return (f"rank {lost[0]} was lost: it stopped on its own (killed, crashed or out of memory), not for a "
                "SIGTERM, and torchrun stopped the others")
    names = ", ".join(map(str, lost[:-1])) + f" and {lost[-1]}"
    return (f"ranks {names} were lost: they stopped on their own (killed, crashed or out of memory), not for a "
            "SIGTERM, and torchrun stopped the others")
