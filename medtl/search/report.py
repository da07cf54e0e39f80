"""What a head search leaves in its workdir: best.yaml, leaderboard.csv, search.html, search_summary.json."""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os

from medtl.config import Config, dump_config
from medtl.evaluate import plots
from medtl.search.space import SearchSpace, with_head
from medtl.utils import fs
from medtl.utils.log import log


def param_importances(study, space, first_rung: int) -> dict[str, float]:
    """Importance of each searched parameter for the first rung's val AUROC (which every trial
    reached, unlike the final value), by Optuna's fANOVA evaluator (a scikit-learn forest)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    scored = [t for t in study.get_trials(deepcopy=False) if first_rung in t.intermediate_values
              and not math.isnan(t.intermediate_values[first_rung]) and set(t.params) == set(space.searched)]
    if len(scored) < 2 or not space.searched:
        return {}
    proxy = optuna.create_study(direction="maximize")
    dists = {k: CategoricalDistribution(list(v)) for k, v in space.searched.items()}
    for t in scored:
        proxy.add_trial(optuna.trial.create_trial(params=t.params, distributions=dists,
                                                  value=t.intermediate_values[first_rung]))
    try:
        return get_param_importances(proxy, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # e.g. all values equal
        return {}


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str, summary: dict, rows: list[dict], plan, importances: dict) -> None:
    cols = ["rank", "trial", "state", "epochs", "val_auroc_last", *[f"val_auroc_{r}ep" for r in plan.rungs], "head"]
    imp = (f'<img src="data:image/png;base64,{plots.search_importances(importances)}">' + _table(
        [{"parameter": k, "importance": f"{v:.3f}"} for k, v in importances.items()], ["parameter", "importance"])
        if importances else "<p>Not enough scored trials with differing values to estimate importances.</p>")
    cost = summary["cost"]
    progress = plots.search_progress(rows, plan.rungs, plan.full_epochs)
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>medtl head search</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}</style></head><body>
<h1>Head search</h1>
<p>{summary['space_size']} heads in the space; {summary['explored']} explored for a budget of
{summary['budget_full_trainings']:g} full trainings ({summary['spent_full_trainings']:.2f} spent).
Best: <b>{html.escape(summary['best']['head'] if summary['best'] else 'none')}</b>
(val macro AUROC {summary['best']['val_auroc'] if summary['best'] else float('nan'):.4f} at
{summary['best']['epochs'] if summary['best'] else 0} epochs).</p>
<p>Cost: feature extraction {cost['extraction_seconds']:.1f} s
({'this run' if cost['extracted_this_run'] else 'an earlier run; reused'}); head trials
{cost['trial_seconds']:.1f} s in all, {cost['seconds_per_trial_epoch']:.3f} s per trial epoch on the cache.</p>
<h2>Progress: val AUROC against cost</h2><img src="data:image/png;base64,{progress}">
<h2>Parameter importance</h2>{imp}
<h2>Leaderboard</h2>{_table(rows, cols)}
</body></html>"""
    fs.write_text_atomic(path, text)


def write_outputs(cfg, space, plan, study, workdir: str, index: dict, extracted: bool, folder: str) -> dict:
    rows = write_leaderboard(os.path.join(workdir, "leaderboard.csv"), study, space, plan)
    best, rung = best_trial(study, plan)
    importances = param_importances(study, space, plan.rungs[0])
    epochs = sum(r["epochs"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    summary = {
        "space_size": space.size, "planned_trials": plan.trials, "explored": len({r["head"] for r in rows}),
        "trials": len(rows), "rungs": list(plan.rungs), "full_epochs": plan.full_epochs,
        "budget_full_trainings": plan.budget_epochs / plan.full_epochs,
        "spent_full_trainings": epochs / plan.full_epochs,
        "best": None, "importances": importances, "feature_cache": folder,
        "cost": {"extraction_seconds": index["seconds"], "extracted_this_run": extracted,
                 "trial_seconds": seconds, "trial_epochs": epochs,
                 "seconds_per_trial_epoch": seconds / epochs if epochs else 0.0},
    }
    if best is not None:
        head = space.head(best.params)
        auroc = best.intermediate_values[rung]
        summary["best"] = {"trial": best.number, "head": head.key(), "params": best.params, "val_auroc": auroc,
                           "epochs": rung}
        text = best_config_text(cfg, head, auroc, rung, plan.full_epochs)
        fs.write_text_atomic(os.path.join(workdir, "best.yaml"), text)
    write_html(os.path.join(workdir, "search.html"), summary, rows, plan, importances)
    fs.write_text_atomic(os.path.join(workdir, "search_summary.json"), json.dumps(summary, indent=2))
    if best is not None:
        log(f"search: best head {summary['best']['head']} (trial {best.number}), val macro AUROC "
            f"{summary['best']['val_auroc']:.4f} at {rung} epoch(s); {summary['explored']} of {space.size} heads "
            f"explored for {summary['spent_full_trainings']:.2f} full trainings")
    log(f"search: wrote {os.path.join(workdir, 'best.yaml')}, leaderboard.csv, search.html")
    return summary


def best_trial(study, plan):
    """The trial with the best val AUROC at the highest rung any trial reached."""
    reached = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    tops = [r for r in plan.rungs if any(r in t.intermediate_values for t in reached)]
    if not tops:
        return None, 0
    top = max(tops)
    candidates = [t for t in reached if top in t.intermediate_values and not math.isnan(t.intermediate_values[top])]
    return max(candidates, key=lambda t: (t.intermediate_values[top], -t.number)), top


def best_config_text(cfg: Config, head, auroc: float, rung: int, full: int) -> str:
    header = (f"# The best head of `medtl search` (val macro AUROC {auroc:.4f} after {rung} of {full} head epochs "
              f"on cached features):\n#   {head.key()}\n# Phase 1 trains this head on the frozen base; the "
              f"later phases are the base config's.\n#   medtl train --config best.yaml --workdir RUN\n")
    return header + dump_config(with_head(cfg, head))


def write_leaderboard(path: str, study, space: SearchSpace, plan) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        last = max(t.intermediate_values)
        row = {"trial": t.number, "state": t.state.name.lower() if t.state.name != "PRUNED"
               else t.user_attrs.get("stopped", "pruned"),
               "epochs": int(t.user_attrs.get("epochs", last)),
               "cost_full_trainings": round(int(t.user_attrs.get("epochs", last)) / plan.full_epochs, 4),
               "seconds": round(float(t.user_attrs.get("seconds", 0.0)), 3),
               "val_auroc_last": round(t.intermediate_values[last], 5)}
        for rung in plan.rungs:
            value = t.intermediate_values.get(rung)
            row[f"val_auroc_{rung}ep"] = "" if value is None else round(value, 5)
        head = space.head(t.params)
        row.update({k: t.params.get(k, v[0]) for k, v in space.choices.items()})
        row["head"] = head.key()
        rows.append(row)
    rows.sort(key=lambda r: (-r["epochs"], -r["val_auroc_last"], r["trial"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    fields = ["rank", "trial", "state", "epochs", "cost_full_trainings", "seconds", "val_auroc_last",
              *[f"val_auroc_{r}ep" for r in plan.rungs], *space.choices, "head"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    fs.write_text_atomic(path, buf.getvalue())
    return rows
