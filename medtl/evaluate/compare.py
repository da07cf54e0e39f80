"""`medtl compare`: per-label AUROC of several reports side by side, with paired bootstrap tests.

Reports must cover the same records (matched by salted record key). Every report
is resampled with the same patient draws, so each difference is tested on paired
resamples; a change is flagged when its interval excludes zero.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from medtl.errors import MedtlError
from medtl.evaluate.bootstrap import bootstrap_distributions, paired_difference
from medtl.evaluate.report import METRICS_FILE, PREDICTIONS_FILE, read_predictions
from medtl.models.metrics import known, ranking_metrics

DEFAULT_RESAMPLES = 1000


def _load(folder: str) -> tuple[dict, dict]:
    for name in (METRICS_FILE, PREDICTIONS_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise MedtlError(f"{folder} is not a report folder (no {name}); write one with `medtl evaluate --out`")
    with open(os.path.join(folder, METRICS_FILE), encoding="utf-8") as fh:
        return json.load(fh), read_predictions(folder)


def _align(base: dict, other: dict, base_name: str, other_name: str) -> dict:
    """`other`'s rows in `base`'s record order; the records and labels must be the same."""
    if list(other["label_names"]) != list(base["label_names"]):
        raise MedtlError(f"{other_name} has labels {list(other['label_names'])} but {base_name} has "
                         f"{list(base['label_names'])}; compare reports of models with the same labels")
    index = {k: i for i, k in enumerate(other["key"])}
    if len(index) != len(base["key"]) or any(k not in index for k in base["key"]):
        raise MedtlError(f"{other_name} and {base_name} do not cover the same records ({len(other['key'])} vs "
                         f"{len(base['key'])}); compare reports of the same split of the same records")
    order = np.array([index[k] for k in base["key"]])
    aligned = {k: (v[order] if k in ("probs", "labels", "mask", "patient", "key") else v) for k, v in other.items()}
    if not (np.array_equal(aligned["labels"], base["labels"]) and np.array_equal(aligned["mask"], base["mask"])):
        raise MedtlError(f"{other_name} and {base_name} disagree on the ground truth of the same records; "
                         "were they evaluated on different ingests?")
    return aligned


def compare(folders: list[str], resamples: int | None = None, seed: int | None = None) -> dict:
    """{'labels', 'reports', 'rows': [{label, auroc: [...], diff: [...], tests: [...]}], 'resamples', ...}."""
    if len(folders) < 2:
        raise MedtlError("compare needs at least two report folders")
    loaded = [_load(f) for f in folders]
    base_metrics, base = loaded[0]
    preds = [base] + [_align(base, p, folders[0], f) for f, (_, p) in zip(folders[1:], loaded[1:])]
    boot = base_metrics.get("bootstrap", {})
    resamples = resamples or boot.get("resamples") or DEFAULT_RESAMPLES
    seed = boot.get("seed", 0) if seed is None else seed
    confidence = boot.get("confidence", 0.95)
    if resamples < 50:
        raise MedtlError(f"--resamples must be >= 50, got {resamples}")
    label_names = [str(n) for n in base["label_names"]]
    draws = [bootstrap_distributions(p["labels"], p["probs"], p["mask"], base["patient"], resamples, seed)
             for p in preds]
    keep = known(base["mask"], base["labels"].shape)
    rows = []
    for i, name in enumerate(label_names + ["macro"]):
        if name == "macro":
            points = [m["macro"]["auroc"] for m, _ in loaded]
            series = [d["macro_auroc"] for d in draws]
        else:
            k = keep[:, i]
            points = [ranking_metrics(p["labels"][k, i], p["probs"][k, i])[0] for p in preds]
            series = [d["auroc"][:, i] for d in draws]
        tests = [None if points[0] is None or points[j] is None else
                 paired_difference(series[j], series[0], confidence) for j in range(1, len(preds))]
        diffs = [None if points[0] is None or p is None else p - points[0] for p in points[1:]]
        rows.append({"label": name, "auroc": points, "diff": diffs, "tests": tests})
    return {"reports": folders, "split": base_metrics.get("split"), "n": int(len(base["key"])), "rows": rows,
            "resamples": resamples, "seed": seed, "confidence": confidence}


def format_table(result: dict) -> str:
    """A plain-text table: AUROC per report, then each report's difference to the first with its test."""
    letters = [chr(ord("A") + i) for i in range(len(result["reports"]))]
    lines = [f"{l}: {path}" for l, path in zip(letters, result["reports"])]
    lines.append(f"split {result['split']}, {result['n']} records; paired patient-level bootstrap, "
                 f"{result['resamples']} resamples, seed {result['seed']}, {result['confidence']:.0%} intervals")
    head = f"{'label':<16}" + "".join(f"{'AUROC ' + l:>10}" for l in letters)
    head += "".join(f"   {l + '-A':>7} {'interval':>17} {'p':>6}  " for l in letters[1:])
    lines += ["", head, "-" * len(head)]
    for row in result["rows"]:
        text = f"{row['label']:<16}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in row["auroc"])
        for diff, test in zip(row["diff"], row["tests"]):
            if diff is None or test is None:
                text += f"   {'n/a':>7} {'':>17} {'':>6}  "
                continue
            ci = f"[{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}]"
            text += f"   {diff:+7.3f} {ci:>17} {test['p_value']:6.3f}{' *' if test['significant'] else '  '}"
        lines.append(text.rstrip())
    lines.append(f"\n* the {result['confidence']:.0%} interval of the difference excludes 0 (significant change)")
    return "\n".join(lines)


def write_csv(path: str, result: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["label", "report", "auroc", "diff_vs_first", "ci_low", "ci_high", "p_value", "significant"])
        for row in result["rows"]:
            for j, report in enumerate(result["reports"]):
                test = row["tests"][j - 1] if j else None
                diff = row["diff"][j - 1] if j else None
                writer.writerow([row["label"], report, "" if row["auroc"][j] is None else row["auroc"][j],
                                 "" if diff is None else diff, *(test["ci"] if test else ("", "")),
                                 test["p_value"] if test else "", test["significant"] if test else ""])


def compare_reports(folders: list[str], out: str | None = None, resamples: int | None = None,
                    seed: int | None = None) -> str:
    result = compare(folders, resamples, seed)
    if out:
        write_csv(out, result)
    return format_table(result)
