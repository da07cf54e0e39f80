"""What a head search leaves in its workdir: best.yaml, leaderboard.csv, search.html, search_summary.json, and
with fractions learning_curve.json (medtl.evaluate.curve)."""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
import os

from medtl.config import Config, dump_config
from medtl.evaluate import plots
from medtl.evaluate.curve import write_learning_curve
from medtl.search.space import SearchSpace, with_head
from medtl.utils import fs
from medtl.utils.log import log


FANOVA_MAX_CHOICES = 16


def param_importances(study, space, first_rung: int) -> dict[str, float]:
    """Importance of each searched parameter for the first rung's val AUROC (which every trial
    reached, unlike the final value), by Optuna's fANOVA evaluator (a scikit-learn forest). One searched
    parameter (a `heads:` space without other choices) has importance 1 by definition; a parameter with
    more than FANOVA_MAX_CHOICES values makes fANOVA's one-hot marginals crawl (minutes for 32 heads), so
    the forest's mean decrease in impurity stands in."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import (FanovaImportanceEvaluator, MeanDecreaseImpurityImportanceEvaluator,
                                   get_param_importances)

    scored = [t for t in study.get_trials(deepcopy=False) if first_rung in t.intermediate_values
              and not math.isnan(t.intermediate_values[first_rung]) and set(t.params) == set(space.searched)]
    if len(scored) < 2 or not space.searched:
        return {}
    if len(space.searched) == 1:
        return {next(iter(space.searched)): 1.0}
    wide = max(len(v) for v in space.searched.values()) > FANOVA_MAX_CHOICES
    evaluator = MeanDecreaseImpurityImportanceEvaluator(seed=0) if wide else FanovaImportanceEvaluator(seed=0)
    proxy = optuna.create_study(direction="maximize")
    dists = {k: CategoricalDistribution(list(v)) for k, v in space.searched.items()}
    for t in scored:
        proxy.add_trial(optuna.trial.create_trial(params=t.params, distributions=dists,
                                                  value=t.intermediate_values[first_rung]))
    try:
        return get_param_importances(proxy, evaluator=evaluator)
    except (RuntimeError, ValueError):  # e.g. all values equal
        return {}


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str, summary: dict, rows: list[dict], plan, importances: dict, figures: dict) -> None:
    cols = ["fraction", "rank", "trial", "state", "second_look", "epochs", "val_auroc_last",
            *[f"val_auroc_{r}ep" for r in plan.rungs], "head"]
    imp = (f'<img src="data:image/png;base64,{plots.search_importances(importances)}">' + _table(
        [{"parameter": k, "importance": f"{v:.3f}"} for k, v in importances.items()], ["parameter", "importance"])
        if importances else "<p>Not enough scored trials with differing values to estimate importances.</p>")
    cost = summary["cost"]
    best = summary["best"]
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>medtl head search</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}</style></head><body>
<h1>Head search</h1>
<p>{summary['space_size']} heads in the space; {summary['explored']} explored for a budget of
{summary['budget_full_trainings']:g} full trainings ({summary['spent_full_trainings']:.2f} spent)
{_on_fraction(summary)}{_second_looks(summary)}. Best: <b>{html.escape(best['head'] if best else 'none')}</b>
(val macro AUROC {best['val_auroc'] if best else float('nan'):.4f} at {best['epochs'] if best else 0} epochs).</p>
<p>Cost: feature extraction {cost['extraction_seconds']:.1f} s
({'this run' if cost['extracted_this_run'] else 'an earlier run; reused'}); head trials
{cost['trial_seconds']:.1f} s in all, {cost['seconds_per_trial_epoch']:.3f} s per trial epoch on the cache.</p>
<h2>Progress: val AUROC against cost</h2><img src="data:image/png;base64,{figures['progress']}">
{_transfer_html(summary, figures)}
<h2>Parameter importance</h2>{imp}
<h2>Leaderboard</h2>{_table(rows, cols)}
</body></html>"""
    fs.write_text_atomic(path, text)


def _second_looks(summary: dict) -> str:
    looks = summary["second_looks"]
    return (f"; {looks['promoted'] + looks['pruned']} failed start(s) given a second look one epoch later, "
            f"{looks['promoted']} promoted (the leaderboard's second_look column)" if any(looks.values()) else "")


def _on_fraction(summary: dict) -> str:
    fractions = summary.get("fractions")
    return f"on fraction {fractions[-1]['fraction']:g} of the train split" if fractions else ""


def _transfer_html(summary: dict, figures: dict) -> str:
    """Subset transfer: per fraction the best head and how its ranking agrees with the largest fraction's."""
    fractions = summary.get("fractions")
    if not fractions:
        return ""
    k = summary["top_k"]
    cols = ["fraction", "train images", "patients", "heads explored", "best head", "best val AUROC",
            "heads compared", "Kendall's tau", f"top-{k} overlap"]
    rows = [{"fraction": f"{f['fraction']:g}", "train images": f["train_images"], "patients": f["train_patients"],
             "heads explored": f["explored"], "best head": f["best_head"] or "none",
             "best val AUROC": "n/a" if f["best_val_auroc"] is None else f"{f['best_val_auroc']:.4f}",
             "heads compared": f["common_heads"],
             "Kendall's tau": "n/a" if f["kendall_tau"] is None else f"{f['kendall_tau']:.3f}",
             f"top-{k} overlap": "n/a" if f["top_k_overlap"] is None else
             f"{f['top_k_overlap']:.2f} (k={f['top_k_used']})"} for f in fractions]
    curve = summary.get("learning_curve")
    curve_html = "" if not curve else (
        f"<h3>Learning curve</h3><p>{html.escape(curve['head'])}, {curve['epochs']} epochs at each fraction: "
        f"<b>{html.escape(curve['verdict'])}</b>.</p><img src=\"data:image/png;base64,{figures['curve']}\">")
    return f"""<h2>Subset transfer</h2>
<p>The same budgeted search on nested subsets of the train split's patients (each fraction's patients include
the smaller fractions'), val fixed. Each fraction's heads are ranked as its leaderboard ranks them (highest rung
reached, then val AUROC there: a head pruned early ranks below the heads that beat it at that rung) and compared
with the largest fraction's ranking on the heads both explored: Kendall's tau of the two orders, and the share of
the largest fraction's best k heads that are also among this fraction's best k.</p>
{_table(rows, cols)}<img src="data:image/png;base64,{figures['ranks']}">{curve_html}"""


def write_outputs(cfg, space, plan, runs, workdir: str, index: dict, extracted: bool, folder: str, curve) -> dict:
    """Every output of the search; `runs` are the fractions' searches (FractionRun), the largest last."""
    from medtl.search.transfer import compare_rankings, head_ranking

    rows = write_leaderboard(os.path.join(workdir, "leaderboard.csv"), runs, space, plan)
    reference = runs[-1]
    mine = [r for r in rows if r["fraction"] == reference.fraction]
    best, rung = best_trial(reference.study, plan)
    importances = param_importances(reference.study, space, plan.rungs[0])
    epochs = sum(r["epochs"] for r in mine)
    seconds = sum(r["seconds"] for r in rows)
    all_epochs = sum(r["epochs"] for r in rows)
    summary = {
        "space_size": space.size, "planned_trials": plan.trials, "explored": len({r["head"] for r in mine}),
        "trials": len(mine),
        "second_looks": {k: sum(r["second_look"] == k and r["state"] != "fail" for r in mine)
                         for k in ("promoted", "pruned")},
        "rungs": list(plan.rungs), "full_epochs": plan.full_epochs,
        "budget_full_trainings": plan.budget_epochs / plan.full_epochs,
        "spent_full_trainings": epochs / plan.full_epochs,
        "best": None, "importances": importances, "feature_cache": folder,
        "cost": {"extraction_seconds": index["seconds"], "extracted_this_run": extracted,
                 "trial_seconds": seconds, "trial_epochs": all_epochs,
                 "seconds_per_trial_epoch": seconds / all_epochs if all_epochs else 0.0},
    }
    figures = {"progress": plots.search_progress(mine, plan.rungs, plan.full_epochs)}
    if len(runs) > 1 or reference.fraction != 1.0:
        rankings = {run.fraction: head_ranking(run.study, plan.rungs) for run in runs}
        summary["top_k"] = cfg.search.top_k
        summary["fractions"] = [_fraction_summary(run, rankings, reference, plan, space, cfg.search.top_k,
                                                  compare_rankings) for run in runs]
        figures["ranks"] = plots.search_rank_agreement(rankings, reference.fraction)
    if curve is not None:
        summary["learning_curve"] = curve.to_dict()
        figures["curve"] = plots.learning_curve([p.fraction for p in curve.points], [p.val_auroc for p in curve.points],
                                                curve.head)
        summary["learning_curve_file"] = write_learning_curve(os.path.abspath(workdir), curve)
    if best is not None:
        head = space.head(best.params)
        auroc = best.intermediate_values[rung]
        summary["best"] = {"trial": best.number, "head": head.key(), "params": best.params, "val_auroc": auroc,
                           "epochs": rung}
        text = best_config_text(cfg, head, auroc, rung, plan.full_epochs, summary.get("learning_curve_file", ""))
        fs.write_text_atomic(os.path.join(workdir, "best.yaml"), text)
    write_html(os.path.join(workdir, "search.html"), summary, rows, plan, importances, figures)
    fs.write_text_atomic(os.path.join(workdir, "search_summary.json"), json.dumps(summary, indent=2))
    _log_outcome(summary, best, rung, space, workdir)
    return summary


def _fraction_summary(run, rankings: dict, reference, plan, space, k: int, compare) -> dict:
    best, rung = best_trial(run.study, plan)
    agreement = compare(rankings[run.fraction], rankings[reference.fraction], k)
    return {"fraction": run.fraction, "train_images": run.subset.images, "train_patients": run.subset.patients,
            "explored": len(rankings[run.fraction]), "ranking": rankings[run.fraction],
            "best_head": space.head(best.params).key() if best else None,
            "best_val_auroc": float(best.intermediate_values[rung]) if best else None, "best_epochs": rung,
            "common_heads": agreement.common, "kendall_tau": agreement.kendall_tau, "top_k_used": agreement.top_k,
            "top_k_overlap": agreement.top_k_overlap}


def _log_outcome(summary: dict, best, rung: int, space, workdir: str) -> None:
    if best is not None:
        log(f"search: best head {summary['best']['head']} (trial {best.number}), val macro AUROC "
            f"{summary['best']['val_auroc']:.4f} at {rung} epoch(s); {summary['explored']} of {space.size} heads "
            f"explored for {summary['spent_full_trainings']:.2f} full trainings")
    for f in summary.get("fractions", [])[:-1]:
        tau = "n/a" if f["kendall_tau"] is None else f"{f['kendall_tau']:.3f}"
        overlap = "n/a" if f["top_k_overlap"] is None else f"{f['top_k_overlap']:.2f}"
        log(f"search: fraction {f['fraction']:g} against {summary['fractions'][-1]['fraction']:g}: Kendall's tau "
            f"{tau} over {f['common_heads']} heads, top-{f['top_k_used']} overlap {overlap}")
    log(f"search: wrote {os.path.join(workdir, 'best.yaml')}, leaderboard.csv, search.html")


def best_trial(study, plan):
    """The trial with the best val AUROC at the highest rung any trial reached."""
    reached = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    tops = [r for r in plan.rungs if any(r in t.intermediate_values for t in reached)]
    if not tops:
        return None, 0
    top = max(tops)
    candidates = [t for t in reached if top in t.intermediate_values and not math.isnan(t.intermediate_values[top])]
    return max(candidates, key=lambda t: (t.intermediate_values[top], -t.number)), top


def best_config_text(cfg: Config, head, auroc: float, rung: int, full: int, curve_file: str = "") -> str:
    header = (f"# The best head of `medtl search` (val macro AUROC {auroc:.4f} after {rung} of {full} head epochs "
              f"on cached features):\n#   {head.key()}\n# Phase 1 trains this head on the frozen base; the "
              f"later phases are the base config's.\n#   medtl train --config best.yaml --workdir RUN\n")
    best = with_head(cfg, head)
    if curve_file:  # the evaluation report's overfitting advice reads whether more data would help
        best = dataclasses.replace(best, evaluate=dataclasses.replace(best.evaluate, learning_curve=curve_file))
    return header + dump_config(best)


def write_leaderboard(path: str, runs, space: SearchSpace, plan) -> list[dict]:
    """leaderboard.csv: one row per trial per fraction (largest fraction first), ranked within its fraction."""
    from medtl.search.transfer import ranking_key

    rows = []
    for run in sorted(runs, key=lambda r: -r.fraction):
        trials = sorted((t for t in run.study.get_trials(deepcopy=False) if t.intermediate_values),
                        key=lambda t: ranking_key(t, plan.rungs))
        for rank, t in enumerate(trials, 1):
            rows.append(_leaderboard_row(t, rank, run, space, plan))
    fields = ["fraction", "train_images", "rank", "trial", "state", "second_look", "epochs", "cost_full_trainings",
              "seconds", "val_auroc_last", *[f"val_auroc_{r}ep" for r in plan.rungs], *space.choices, "head"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    fs.write_text_atomic(path, buf.getvalue())
    return rows


def _leaderboard_row(t, rank: int, run, space: SearchSpace, plan) -> dict:
    last = max(t.intermediate_values)
    epochs = int(t.user_attrs.get("epochs", last))
    row = {"fraction": run.fraction, "train_images": run.subset.images, "rank": rank, "trial": t.number,
           "state": t.state.name.lower() if t.state.name != "PRUNED" else t.user_attrs.get("stopped", "pruned"),
           # a failed start's second look, one epoch after the first rung: promoted or pruned
           "second_look": t.user_attrs.get("second_look", ""),
           "epochs": epochs, "cost_full_trainings": round(epochs / plan.full_epochs, 4),
           "seconds": round(float(t.user_attrs.get("seconds", 0.0)), 3),
           "val_auroc_last": round(t.intermediate_values[last], 5)}
    for rung in plan.rungs:
        value = t.intermediate_values.get(rung)
        row[f"val_auroc_{rung}ep"] = "" if value is None else round(value, 5)
    row.update({k: t.params.get(k, v[0]) for k, v in space.choices.items()})
    row["head"] = space.head(t.params).key()
    return row
