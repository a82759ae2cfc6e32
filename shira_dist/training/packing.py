"""Sample packing (``task.packing: true``, causal_lm): several tokenized examples per training row.

    examples (input_ids, targets)  ──best-fit decreasing──►  bins of example indices, each bin's
                                                             total length <= task.max_length
    bin [a, b, c]                  ──concatenate──►          one packed row:

        input_ids     a0 a1 a2 a3 | b0 b1 | c0 c1 c2
        targets       -- a1 a2 a3 | -- b1 | -- c1 c2     (each example's first token: IGNORE)
        position_ids   0  1  2  3 |  0  1 |  0  1  2

Attention stays inside each example: the job calls the model with these position_ids and no
attention_mask, and transformers (masking_utils.find_packed_sequence_indices, for sdpa, eager,
flex and flash attention) reads a restart of the positions as the start of a new sequence and
builds a block-diagonal causal mask. The loss never crosses a boundary either: the objective
predicts targets[t+1] from position t, and the target at each example's first token is
IGNORE, so no example's first token is predicted from the previous example's last one. A
packed row therefore gives each example the logits and loss it gets alone (tests/training/
test_packing.py). Padding (collate) continues the positions from 0 again, a segment of its own
that no real token attends to, with IGNORE targets.

Only the training set is packed; held-out evaluation scores examples one per row, as before.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from .formats import IGNORE


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing (TRL's default packing strategy): each example, longest first, goes
    into the open bin it fills best (least room left after it), or opens a new one.

    Args:
        lengths: (N,) token count of each example, each in [1, max_length].
        max_length: the capacity of a bin.
    Returns:
        bins of example indices (every index once), in order of opening; inside a bin, the
        order the examples were placed. Deterministic: ties go to the lower index.
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..max_length={max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []  # room of every bin, sorted
    by_room: dict[int, list[int]] = {}  # room -> bins with that much room (a stack)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, n)  # the least room that still fits
        if k < len(room):
            left = room.pop(k)
            b = by_room[left].pop()
        else:
            left, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, left - n)
        by_room.setdefault(left - n, []).append(b)
    return bins


def packed_row(examples: Sequence[dict]) -> dict[str, list[int]]:
    """One packed row from encoded causal-LM examples (each {"input_ids": (n_i,), "targets": (n_i,)}).

    Returns input_ids, targets and position_ids, each (sum n_i,): the examples concatenated,
    each example's first target IGNORE, positions restarting at 0 for every example."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        targets += [IGNORE] + list(e["targets"][1:n])
        positions += range(n)
    return {"input_ids": ids, "targets": targets, "position_ids": positions}


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Encoded causal-LM examples -> packed rows (pack_bins, then packed_row per bin), each at most
    ``max_length`` tokens long."""
    bins = pack_bins([len(e["input_ids"]) for e in examples], max_length)
    return [packed_row([examples[i] for i in b]) for b in bins]


def pack_dataset(ds, max_length: int):
    """A datasets.Dataset of encoded causal-LM examples -> one of packed rows (input_ids, targets,
    position_ids), kept in memory. Every rank packs alike (a pure function of the examples)."""
    import datasets

    examples = [{"input_ids": i, "targets": t} for i, t in zip(ds["input_ids"], ds["targets"])]
    rows = pack_examples(examples, max_length)
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "targets", "position_ids")})

