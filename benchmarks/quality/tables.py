"""Markdown tables from the cached cells: (a) single-task, (b) fused, and the paper's numbers.

Accuracies are in % (mean ± sample std over the seeds present; "n=" says how many when fewer
than asked). A fused drop is, per seed, the mean over tasks of (single − fused), then
mean ± std over seeds.
"""

from __future__ import annotations

import statistics
from typing import Optional

from methods import PAPER_NAMES

# Bhardwaj et al., NeurIPS 2024 (SHiRA).
PAPER_FUSED_DROP = {"lora": 11.08, "shira_wm": 4.43, "shira_wm_disjoint": 3.62}  # Table 4, avg points lost
PAPER_COMMONSENSE = {"lora": 74.7, "shira_grad": 76.6, "shira_wm": 77.0, "shira_snip": 77.4}  # Table 2, LLaMA-7B


def _ms(values: list[float], want: int, scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(values) >= want else f"{text} (n={len(values)})"


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def single_table(cells: dict, base: dict, methods: list[str], tasks: list[str], seeds: list[int]) -> str:
    """cells[(method, seed, task)] -> cell JSON; base[task] -> base JSON."""
    head = ["method", *tasks, "avg", "train s / cell", "eval s / cell", "peak ΔRSS MB", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        accs = [f"{base[t]['accuracy'] * 100:.1f}" if t in base else "–" for t in tasks]
        lines.append("| base model (no adapter) | " + " | ".join(accs) + " | " +
                     (f"{statistics.fmean(base[t]['accuracy'] for t in tasks if t in base) * 100:.1f}" if base else "–")
                     + " | – | – | – | – |")
    for m in methods:
        row = [PAPER_NAMES[m]]
        per_seed_avg = []
        for t in tasks:
            row.append(_ms([cells[(m, s, t)]["accuracy"] for s in seeds if (m, s, t) in cells], len(seeds)))
        for s in seeds:
            if all((m, s, t) in cells for t in tasks):
                per_seed_avg.append(statistics.fmean(cells[(m, s, t)]["accuracy"] for t in tasks))
        row.append(_ms(per_seed_avg, len(seeds)))
        mine = [c for (mm, _, _), c in cells.items() if mm == m]
        for key, fmt in (("train_seconds", "{:.1f}"), ("eval_seconds", "{:.1f}"), ("peak_delta_rss_mb", "{:.0f}"),
                         ("trainable", "{:,}")):
            value = _mean([c[key] for c in mine])
            row.append(fmt.format(value if key != "trainable" else int(value)) if value is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def fused_table(cells: dict, fused: dict, methods: list[str], tasks: list[str], seeds: list[int]) -> str:
    """fused[(method, seed)] -> fused JSON ({"accuracy": {task: acc}, "shared": ...})."""
    head = ["method", *[f"{t} fused (single)" for t in tasks], "avg fused", "avg drop (points)", "shared entries"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [PAPER_NAMES[m]]
        done = [s for s in seeds if (m, s) in fused and all((m, s, t) in cells for t in tasks)]
        for t in tasks:
            f = _ms([fused[(m, s)]["accuracy"][t] for s in done], len(seeds))
            single = _ms([cells[(m, s, t)]["accuracy"] for s in done], len(seeds))
            row.append(f"{f} ({single})")
        row.append(_ms([statistics.fmean(fused[(m, s)]["accuracy"][t] for t in tasks) for s in done], len(seeds)))
        drops = [statistics.fmean(cells[(m, s, t)]["accuracy"] - fused[(m, s)]["accuracy"][t] for t in tasks)
                 for s in done]
        row.append(_ms(drops, len(seeds)))
        shared = [fused[(m, s)]["shared"] for s in done if "shared" in fused[(m, s)]]
        row.append(f"{statistics.fmean(shared) * 100:.1f} %" if shared else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paper_table(cells: dict, fused: dict, methods: list[str], tasks: list[str], seeds: list[int]) -> str:
    head = ["method", "paper: fused avg drop (Table 4)", "here: fused avg drop",
            "paper: LLaMA-7B commonsense avg (Table 2)", "here: single-task avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        done = [s for s in seeds if (m, s) in fused and all((m, s, t) in cells for t in tasks)]
        drops = [statistics.fmean(cells[(m, s, t)]["accuracy"] - fused[(m, s)]["accuracy"][t] for t in tasks)
                 for s in done]
        single = [statistics.fmean(cells[(m, s, t)]["accuracy"] for t in tasks)
                  for s in seeds if all((m, s, t) in cells for t in tasks)]
        paper_drop = f"{PAPER_FUSED_DROP[m]:.2f}" if m in PAPER_FUSED_DROP else "–"
        paper_cs = f"{PAPER_COMMONSENSE[m]:.1f}" if m in PAPER_COMMONSENSE else "–"
        lines.append(f"| {PAPER_NAMES[m]} | {paper_drop} | {_ms(drops, len(seeds), digits=2)} | {paper_cs} | "
                     f"{_ms(single, len(seeds))} |")
    return "\n".join(lines)
