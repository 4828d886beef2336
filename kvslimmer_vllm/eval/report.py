"""Tables and plots of an evaluation: CSV, a markdown report, PNG plots.

Calibration: a (task, length) cell enters the summary only if full KV scores at least
``spec.calibration`` on it, so tasks the model cannot do even with its whole cache do not
drown the comparison. NLL and agreement are reported beside the scores, uncalibrated.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from kvslimmer_vllm.eval.spec import EvalSpec
from kvslimmer_vllm.eval.tasks import AGREEMENT_TASK, NLL_TASK, TASKS

#: Quality targets of the default method: share of the full-KV score kept at a budget.
TARGETS = {0.5: 0.90, 0.25: 0.60}


def cell_means(rows: list[dict]) -> dict[tuple, float]:
    """Mean score per (task, length, method, budget)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["length"], r["method"], r["budget"])].append(r["score"])
    return {k: mean(v) for k, v in groups.items()}


def wilson(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate ``score`` over ``n`` cases."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (score + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(rows: list[dict], spec: EvalSpec) -> dict:
    """Per (method, budget): calibrated score with its 95% Wilson interval over the
    calibrated cases, its share of full KV's, NLL increase, agreement; plus the
    calibrated cells and the verdicts."""
    cells = cell_means(rows)
    calibrated = sorted(
        (t, n) for (t, n, m, _), v in cells.items()
        if m == "none" and t in TASKS and v >= spec.calibration
    )
    full_score = mean(cells[(t, n, "none", "full")] for t, n in calibrated) if calibrated else None
    cases: dict[tuple, int] = defaultdict(int)
    for r in rows:
        if (r["task"], r["length"]) in set(calibrated):
            cases[(r["method"], r["budget"])] += 1
    per = {}
    for method in spec.variants:
        for b in spec.budgets:
            label = spec.budget_label(b)
            score = (mean(cells[(t, n, method, label)] for t, n in calibrated)
                     if calibrated else None)
            count = cases[(method, label)]
            nll = [cells[(NLL_TASK, n, method, label)] - cells[(NLL_TASK, n, "none", "full")]
                   for n in spec.lengths if (NLL_TASK, n, method, label) in cells]
            agree = [cells[(AGREEMENT_TASK, n, method, label)] for n in spec.lengths
                     if (AGREEMENT_TASK, n, method, label) in cells]
            per[(method, label)] = {
                "score": score,
                "interval": wilson(score, count) if score is not None else None,
                "cases": count,
                "kept": score / full_score if score is not None and full_score else None,
                "nll_increase": mean(nll) if nll else None,
                "agreement": mean(agree) if agree else None,
            }
    return {"cells": cells, "calibrated": calibrated, "full_score": full_score, "per": per,
            "by_depth": _by_depth(rows, calibrated), "verdicts": _verdicts(spec, per)}


def _by_depth(rows: list[dict], calibrated: list[tuple]) -> dict[float, dict[tuple, float]]:
    """Mean score per needle depth and (method, budget), over the calibrated cells."""
    cells = set(calibrated)
    groups: dict[float, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["task"], r["length"]) in cells and r.get("depth") not in (None, ""):
            groups[float(r["depth"])][(r["method"], r["budget"])].append(r["score"])
    return {d: {k: mean(v) for k, v in g.items()} for d, g in sorted(groups.items())}


def _verdicts(spec: EvalSpec, per: dict) -> list[str]:
    out = []
    for b in spec.budgets:
        label = spec.budget_label(b)
        scored = {m: per[(m, label)]["score"] for m in spec.variants
                  if per[(m, label)]["score"] is not None}
        if scored:
            top = max(scored.values())
            best = [m for m, v in scored.items() if v == top]
            out.append(f"Best at {label}: {', '.join(best)} ({top:.3f}).")
    if "kvslimmer" not in spec.variants:
        return out
    for b in spec.budgets:
        label = spec.budget_label(b)
        kept = per[("kvslimmer", label)]["kept"]
        if b in TARGETS and kept is not None:
            target = TARGETS[b]
            verdict = "met" if kept >= target else f"missed by {100 * (target - kept):.1f} points"
            out.append(f"KVSlimmer keeps {kept:.1%} of the full-KV score at a {label} budget "
                       f"(target {target:.0%}): {verdict}.")
        others = [m for m in spec.variants if m != "kvslimmer"]
        mine = per[("kvslimmer", label)]["score"]
        if mine is not None and others:
            beaten = [m for m in others if per[(m, label)]["score"] is not None
                      and per[(m, label)]["score"] >= mine]
            out.append(f"At {label}, KVSlimmer's calibrated score {mine:.3f} " + (
                "beats every baseline." if not beaten else
                f"does not beat {', '.join(beaten)} "
                "(" + ", ".join(f"{per[(m, label)]['score']:.3f}" for m in beaten) + ")."))
        nll = {m: per[(m, label)]["nll_increase"] for m in spec.variants
               if per[(m, label)]["nll_increase"] is not None}
        if "kvslimmer" in nll and len(nll) > 1:
            best = min(nll, key=nll.get)
            out.append(f"At {label}, the smallest NLL increase is {best}'s ({nll[best]:+.4f}"
                       f" nats/token; KVSlimmer {nll['kvslimmer']:+.4f}).")
    return out


def _fmt(x: float | None, pct: bool = False, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else (f"{x:+.4f}" if sign else f"{x:.3f}")


def markdown(rows: list[dict], spec: EvalSpec, summary: dict, command: str = "") -> str:
    cells, per = summary["cells"], summary["per"]
    lines = ["# KV compression quality", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Lengths {spec.lengths} tokens, budgets "
        f"{[spec.budget_label(b) for b in spec.budgets]}, {spec.cases} case(s) per task and "
        f"length, seed {spec.seed}, interval {spec.interval}, sink {spec.sink}.",
        "",
        "## Summary (calibrated cells)",
        "",
        f"Cells where full KV scores at least {spec.calibration}: "
        + (", ".join(f"{t}@{n}" for t, n in summary["calibrated"]) or "none") + ". "
        + (f"Full-KV score on them: {summary['full_score']:.3f}."
           if summary["full_score"] is not None else ""),
        "",
        "| method | budget | score | 95% interval (cases) | kept vs full KV | "
        "NLL increase (nats/token) | agreement with full KV |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, label), v in per.items():
        interval = ("-" if v["interval"] is None else
                    f"{v['interval'][0]:.2f}-{v['interval'][1]:.2f} ({v['cases']})")
        lines.append(f"| {method} | {label} | {_fmt(v['score'])} | {interval} | "
                     f"{_fmt(v['kept'], pct=True)} | {_fmt(v['nll_increase'], sign=True)} | "
                     f"{_fmt(v['agreement'])} |")
    if summary["verdicts"]:
        lines += ["", *[f"- {v}" for v in summary["verdicts"]]]
    configs = [("none", "full")] + [(m, spec.budget_label(b)) for m in spec.variants
                                    for b in spec.budgets]
    header = " | ".join("full KV" if m == "none" else f"{m} {b}" for m, b in configs)
    if summary["by_depth"]:
        lines += ["", "## Score by needle depth (calibrated cells)", "",
                  f"| depth | {header} |", "|---|" + "---|" * len(configs)]
        for depth, vals in summary["by_depth"].items():
            lines.append(f"| {depth:.0%} | " + " | ".join(_fmt(vals.get(c)) for c in configs)
                         + " |")
    lines += ["", "## Every cell", ""]
    lines.append(f"| task | length | {header} |")
    lines.append("|---|---|" + "---|" * len(configs))
    for task in spec.tasks:
        for n in spec.lengths:
            vals = [cells.get((task, n, m, b)) for m, b in configs]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {task} | {n} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", "Scores: fraction of expected strings found (docqa: words of the "
              "continuation reproduced in order); nll: mean NLL of the continuation in "
              "nats/token (lower is better; prompt-end variants compress before the "
              "continuation, observed by the context's last window); agreement: answer "
              "tokens equal to full KV's. Intervals: 95% Wilson, taking the mean score "
              "over the calibrated cases as a success rate."
              + (" A method's '-': not run, because full KV scored below the calibration "
                 "on that cell (--all-cells runs it)." if spec.skip_uncalibrated else ""), ""]
    return "\n".join(lines)


def plot(summary: dict, spec: EvalSpec, path: Path) -> None:
    """One panel per task: score (averaged over lengths) against budget, a line per
    method, full KV dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    tasks = list(spec.tasks)
    cols = min(4, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    xs = list(spec.budgets)
    for ax, task in zip(axes.flat, tasks):
        # Lengths where the methods ran (skipped cells have only full KV), so that the
        # full-KV line is the mean over the same cells as the methods' points.
        ran = [n for n in spec.lengths
               if any(k[0] == task and k[1] == n and k[2] != "none" for k in cells)]
        ax.set_title(task)
        if not ran:
            full = _avg(cells, task, spec.lengths, "none", "full")
            ax.text(0.5, 0.5, "methods not run:\nfull KV " + ("-" if full is None else
                    f"{full:.2f}") + f" < calibration {spec.calibration}",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for method in spec.variants:
            ys = [_avg(cells, task, ran, method, spec.budget_label(b)) for b in xs]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o",
                    label=method)
        full = _avg(cells, task, ran, "none", "full")
        if full is not None and task != AGREEMENT_TASK:
            ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full KV")
        ax.set_xlabel("budget (fraction of prompt)" if xs[0] < 1 else "budget (tokens)")
        ax.set_ylabel("NLL (nats/token)" if task == NLL_TASK else "score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    columns = min(len(labels), 2 * cols)  # many variants: a legend of several rows
    fig.legend(handles, labels, loc="lower center", ncol=columns)
    fig.suptitle(f"Score vs KV budget (mean over the lengths of {spec.lengths} each task ran at)")
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // columns), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _avg(cells, task, lengths, method, label):
    vals = [cells[(task, n, method, label)] for n in lengths if (task, n, method, label) in cells]
    return mean(vals) if vals else None


def write_results(rows: list[dict], spec: EvalSpec, out: Path, command: str = "") -> dict:
    """Write ``rows.csv``, ``cells.csv``, ``summary.md``, ``scores.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, spec)
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "length", "method", "budget", "score"])
        for (t, n, m, b), v in sorted(summary["cells"].items(), key=str):
            writer.writerow([t, n, m, b, f"{v:.6f}"])
    (out / "summary.md").write_text(markdown(rows, spec, summary, command))
    (out / "spec.json").write_text(spec.model_dump_json(indent=2))
    plot(summary, spec, out / "scores.png")
    return summary
