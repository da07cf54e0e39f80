"""What a head search leaves in its workdir: best.yaml, leaderboard.csv, search.html, search_summary.json."""
from __future__ import annotations

import html
import json
import math
import os

from medtl.evaluate.plots import ACCENT, COLOR, MUTED, _plt, to_png
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


def progress_png(rows: list[dict], plan) -> str:
    """Each trial's last val AUROC against the cumulative cost when it ended, by rung reached."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ordered = sorted(rows, key=lambda r: r["trial"])
    cost, xs = 0.0, []
    for r in ordered:
        cost += r["cost_full_trainings"]
        xs.append(cost)
    colors = [COLOR, "#3fa34d", "#e0a030", ACCENT, "#7b4fa0", MUTED]
    for i, rung in enumerate(plan.rungs):
        sel = [(x, r["val_auroc_last"]) for x, r in zip(xs, ordered) if r["epochs"] >= rung and
               (i + 1 == len(plan.rungs) or r["epochs"] < plan.rungs[i + 1])]
        if sel:
            ax.scatter(*zip(*sel), s=18, color=colors[i % len(colors)], label=f"stopped at rung {i + 1} ({rung} ep)")
    best, line = -math.inf, []
    for x, r in zip(xs, ordered):
        if r["epochs"] == plan.full_epochs:
            best = max(best, r["val_auroc_last"])
        if best > -math.inf:
            line.append((x, best))
    if line:
        ax.step(*zip(*line), where="post", color="black", lw=1, label="best full-schedule head so far")
    ax.set_xlabel("cost spent (full trainings)")
    ax.set_ylabel("val macro AUROC")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return to_png(fig)


def importance_png(importances: dict[str, float]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color=COLOR)
    ax.set_xlabel("importance (fANOVA, first-rung val AUROC)")
    return to_png(fig)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str, summary: dict, rows: list[dict], plan, importances: dict) -> None:
    cols = ["rank", "trial", "state", "epochs", "val_auroc_last", *[f"val_auroc_{r}ep" for r in plan.rungs], "head"]
    imp = (f'<img src="data:image/png;base64,{importance_png(importances)}">' + _table(
        [{"parameter": k, "importance": f"{v:.3f}"} for k, v in importances.items()], ["parameter", "importance"])
        if importances else "<p>Not enough scored trials with differing values to estimate importances.</p>")
    cost = summary["cost"]
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
<h2>Progress: val AUROC against cost</h2><img src="data:image/png;base64,{progress_png(rows, plan)}">
<h2>Parameter importance</h2>{imp}
<h2>Leaderboard</h2>{_table(rows, cols)}
</body></html>"""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_outputs(cfg, space, plan, study, workdir: str, index: dict, extracted: bool, folder: str) -> dict:
    from medtl.search.run import best_config_text, best_trial, write_leaderboard

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
        tmp = os.path.join(workdir, "best.yaml.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(workdir, "best.yaml"))
    write_html(os.path.join(workdir, "search.html"), summary, rows, plan, importances)
    with open(os.path.join(workdir, "search_summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    if best is not None:
        log(f"search: best head {summary['best']['head']} (trial {best.number}), val macro AUROC "
            f"{summary['best']['val_auroc']:.4f} at {rung} epoch(s); {summary['explored']} of {space.size} heads "
            f"explored for {summary['spent_full_trainings']:.2f} full trainings")
    log(f"search: wrote {os.path.join(workdir, 'best.yaml')}, leaderboard.csv, search.html")
    return summary
