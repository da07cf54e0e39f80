"""The report folder: report.html (self-contained, inline PNG plots), metrics.json, per_label.csv,
and predictions.npz (per-record probabilities for `medtl compare`; salted hashes only). This module
owns metrics.json: `read_summary` reads it back as a typed `ReportSummary` (for the model card)."""
from __future__ import annotations

import csv
import html
import json
import os
from dataclasses import dataclass

import numpy as np

from medtl.evaluate import plots

METRICS_FILE = "metrics.json"
PER_LABEL_FILE = "per_label.csv"
PREDICTIONS_FILE = "predictions.npz"
REPORT_FILE = "report.html"
PER_LABEL_COLUMNS = ("label", "n", "excluded", "positives", "prevalence", "auroc", "auroc_ci_low",
                     "auroc_ci_high", "auprc", "auprc_ci_low", "auprc_ci_high", "threshold", "sensitivity",
                     "specificity", "ppv", "npv", "f1", "tp", "fp", "tn", "fn", "ece", "note")
SECTIONS = ("summary", "provenance", "auroc", "prevalence", "roc", "pr", "calibration", "subgroups", "training",
            "overfitting")
# Sections present only when asked for: an export on other records, and evaluate.saliency.
OPTIONAL_SECTIONS = ("external", "saliency")


def write_predictions(out: str, preds: dict, label_names, thresholds) -> None:
    """Per-record arrays (no raw identifiers: patient and key are salted hashes). probs are the reported
    (calibrated, when evaluate.calibration is on) probabilities; uncalibrated_probs the model's own."""
    extra = {"uncalibrated_probs": preds["raw_probs"]} if "raw_probs" in preds else {}
    np.savez_compressed(os.path.join(out, PREDICTIONS_FILE), probs=preds["probs"], labels=preds["labels"],
                        mask=preds["mask"], patient=preds["patient"], key=preds["key"],
                        label_names=np.array(label_names), thresholds=np.asarray(thresholds, np.float64), **extra)


def read_predictions(folder: str) -> dict:
    path = os.path.join(folder, PREDICTIONS_FILE)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def write_per_label_csv(path: str, labels: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(PER_LABEL_COLUMNS)
        for name, row in labels.items():
            flat = {"label": name, **row}
            for key in ("auroc", "auprc"):
                ci = row.get(f"{key}_ci") or (None, None)
                flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = ci
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in PER_LABEL_COLUMNS])


def write_metrics_json(path: str, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)


# --------------------------------------------------------------------------- HTML


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _with_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    if not ci:
        return f"<b>{value:.3f}</b>"
    return f"<b>{value:.3f}</b> <span class=ci>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _summary_rows(report: dict) -> str:
    rows = []
    for name, r in report["labels"].items():
        note = html.escape(r["note"]) + (f" {html.escape(r['threshold_note'])}" if r.get("threshold_note") else "")
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{r['n']}</td><td>{r['excluded']}</td><td>{r['positives']}</td>"
            f"<td>{_pct(r['prevalence'])}</td><td>{_with_ci(r['auroc'], r.get('auroc_ci'))}</td>"
            f"<td>{_with_ci(r['auprc'], r.get('auprc_ci'))}</td><td>{r['threshold']:.3f}</td>"
            f"<td>{_pct(r['sensitivity'])}</td><td>{_pct(r['specificity'])}</td><td>{_pct(r['ppv'])}</td>"
            f"<td>{_pct(r['npv'])}</td><td>{fmt(r['f1'])}</td><td>{fmt(r['ece'])}</td>"
            f"<td class=note>{note}</td></tr>")
    for kind in ("macro", "micro"):
        m = report[kind]
        cells = (f"<td>{_pct(m.get('sensitivity'))}</td><td>{_pct(m.get('specificity'))}</td>"
                 f"<td>{_pct(m.get('ppv'))}</td><td>{_pct(m.get('npv'))}</td><td>{fmt(m.get('f1'))}</td>"
                 if kind == "macro" else "<td></td>" * 5)
        explain = (f"mean over the {m['labels_averaged']} labels with both classes" if kind == "macro"
                   else "all known (image, label) pairs pooled")
        rows.append(
            f"<tr class=avg><th>{kind} average</th><td colspan=4 class=note>{explain}</td>"
            f"<td>{_with_ci(m['auroc'], m.get('auroc_ci'))}</td><td>{_with_ci(m['auprc'], m.get('auprc_ci'))}</td>"
            f"<td></td>{cells}<td>{fmt(m.get('ece'))}</td><td></td></tr>")
    return "\n".join(rows)


def phase_summary(history: list[dict] | None, cfg) -> list[dict]:
    """Per phase of the run's history: what of the base trained, the epochs run and its best val macro AUROC
    (the first row of a transfer run is the head-only figure: how well the base's features serve the task)."""
    if not history:
        return []
    phases = {phase.name: phase for phase in cfg.phases}
    rows: dict[str, dict] = {}
    for row in history:
        name = row["phase"]
        phase = phases.get(name)
        entry = rows.setdefault(name, {"phase": name, "epochs": 0, "best_val_auroc": None,
                                       "trainable": _trainable_text(phase) if phase else "?"})
        entry["epochs"] += 1
        value = row.get("val_auroc")
        if value is not None and (entry["best_val_auroc"] is None or value > entry["best_val_auroc"]):
            entry["best_val_auroc"] = value
    return list(rows.values())


def _trainable_text(phase) -> str:
    kind = phase.trainable.kind
    what = {"none": "head only (base frozen)", "all": "whole base",
            "top_blocks": f"top {phase.trainable.blocks} block(s)",
            "top_fraction": f"top {phase.trainable.fraction:.0%} of the base",
            "regex": f"layers matching {phase.trainable.pattern}"}[kind]
    bn = "" if kind == "none" else (", BatchNorm training" if phase.train_batch_norm else ", BatchNorm frozen")
    return f"{what}{bn}, lr {phase.learning_rate:g}"


def _phase_rows(phases: list[dict]) -> str:
    return "\n".join(f"<tr><th>{html.escape(r['phase'])}</th><td class=note>{html.escape(r['trainable'])}</td>"
                     f"<td>{r['epochs']}</td><td>{fmt(r['best_val_auroc'])}</td></tr>" for r in phases)


def _provenance_rows(provenance: dict) -> str:
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                     for k, v in provenance.items())


def _figure(section: str, title: str, png: str | None, caption: str, missing: str = "", extra: str = "") -> str:
    body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png
            else f"<p class=missing>{html.escape(missing)}</p>")
    return (f'<section id="{section}"><h2>{html.escape(title)}</h2><p class=caption>{caption}</p>'
            f"{body}{extra}</section>")


# --------------------------------------------------------------------------- calibration, subgroups, links


def _calibration_caption(report: dict) -> str:
    cal = report.get("calibration") or {"method": "none"}
    bins = (f"{report['calibration_bins']} equal-width probability bins; marker area ~ images in the bin. "
            "On the diagonal = calibrated. ECE: expected calibration error.")
    if cal["method"] == "none":
        return bins + " The probabilities are the model's own (evaluate.calibration: none)."
    return (f"{bins} Grey: the model's own probabilities; blue: after {html.escape(cal['method'])} calibration, "
            f"fitted per label on {html.escape(cal['fitted_on'])} ({cal['val_records']} images) before the "
            "thresholds were tuned; every figure of this report uses the calibrated probabilities. "
            "Titles: ECE before &rarr; after.")


def _calibration_table(report: dict) -> str:
    cal = report.get("calibration") or {"method": "none"}
    if cal["method"] == "none":
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(r['map'])}</td><td>{fmt(r['val_ece'][0])} &rarr; "
        f"{fmt(r['val_ece'][1])}</td><td>{fmt(r['ece_before'])}</td><td><b>{fmt(r['ece_after'])}</b></td>"
        f"<td class=note>{html.escape(r['note'])}</td></tr>" for name, r in cal["labels"].items())
    pooled = cal["micro"]
    rows += (f"<tr class=avg><th>all labels (pooled)</th><td></td><td></td><td>{fmt(pooled['ece_before'])}</td>"
             f"<td><b>{fmt(pooled['ece_after'])}</b></td><td></td></tr>")
    return (f"<table><thead><tr><th>label</th><th>{html.escape(cal['method'])} map</th><th>val ECE</th>"
            f"<th>{html.escape(report['split'])} ECE before</th><th>after</th><th>note</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _group_cell(row: dict, overall) -> str:
    cell = _with_ci(row["auroc"], row.get("auroc_ci"))
    if row.get("below_overall"):
        return f"<td class=flag title=\"interval below the overall {fmt(overall)}\">&#9873; {cell}</td>"
    return f"<td>{cell}</td>"


def _subgroup_table(field: str, result: dict, report: dict) -> str:
    names = list(report["labels"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    overall = (f"<tr class=avg><th>all</th><td>{report['n']}</td><td>{report['patients']}</td>"
               f"<td>{_with_ci(report['macro']['auroc'], report['macro'].get('auroc_ci'))}</td>"
               + "".join(f"<td>{_with_ci(report['labels'][n]['auroc'], report['labels'][n].get('auroc_ci'))}</td>"
                         for n in names) + "</tr>")
    rows = "".join(
        f"<tr><th>{html.escape(group)}</th><td>{g['n']}</td><td>{g['patients']}</td>"
        + _group_cell(g["macro"], g["macro"]["overall_same_labels"])
        + "".join(_group_cell(g["labels"][n], report["labels"][n]["auroc"]) for n in names) + "</tr>"
        for group, g in result["groups"].items())
    notes = []
    limit = report["subgroups"]["min_patients"]
    if result["merged"]:
        notes.append(f"Merged into <b>other</b> (fewer than {limit} patients each): "
                     f"{html.escape(', '.join(result['merged']))}.")
    if result["suppressed"]:
        notes.append(f"Suppressed (fewer than {limit} patients even when merged): "
                     f"{html.escape(', '.join(result['suppressed']))} ({html.escape(', '.join(result['merged']))}).")
    note = f"<p class=note>{' '.join(notes)}</p>" if notes else ""
    return (f"<h3>{html.escape(field)}</h3><table><thead><tr><th>group</th><th>images</th><th>patients</th>"
            f"<th>macro AUROC [CI]</th>{head}</tr></thead><tbody>{overall}{rows}</tbody></table>{note}")


def _subgroups_section(report: dict) -> str:
    sub = report.get("subgroups")
    kept = ", ".join(report.get("fields_kept") or []) or "none"
    if not sub:
        body = (f"<p class=caption>Not asked for. Set evaluate.subgroups to fields kept at ingest (these records "
                f"kept: {html.escape(kept)}; `medtl ingest --keep-fields` keeps them).</p>")
    else:
        body = (f"<p class=caption>AUROC [interval] per group, with the report's patient-level bootstrap. "
                f"&#9873; flags a group whose interval lies below the overall figure (macro: the overall mean over "
                f"the labels the group has both classes of). Groups with fewer than {sub['min_patients']} patients "
                "(evaluate.subgroup_min_patients) are merged into <b>other</b>, which is suppressed when still that "
                "small; their counts are not shown.</p>"
                + "".join(_subgroup_table(f, r, report) for f, r in sub["fields"].items()))
    return f'<section id="subgroups"><h2>Subgroups</h2>{body}</section>'


def _links(report: dict) -> str:
    links = report.get("links") or {}
    parts = [f'<a href="{html.escape(path)}">{html.escape(name)}</a>' for name, path in links.items() if path]
    if "model card" in links and not links["model card"]:
        parts.append("no model card yet (`medtl export` writes one; the run index links it)")
    return f"<p class=links>{' &middot; '.join(parts)}</p>" if parts else ""


STYLE = """
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 32px 0 6px; border-bottom: 2px solid #e3e6eb; padding-bottom: 4px; }
.headline { display: flex; gap: 14px; flex-wrap: wrap; margin: 14px 0; }
.card { border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 16px; min-width: 150px; background: #fafbfc; }
.card .v { font-size: 24px; font-weight: bold; color: #1f5fa8; } .card .k { font-size: 12px; color: #5b6270; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border-bottom: 1px solid #e3e6eb; padding: 5px 8px; text-align: right; vertical-align: top; }
th { text-align: left; } thead th { background: #eef1f5; text-align: center; font-size: 12px; }
tr.avg th, tr.avg td { background: #f3f6fb; } td.flag { background: #fde8e8; }
h3 { font-size: 15px; margin: 18px 0 4px; } p.note { color: #8a3b12; font-size: 12px; }
.ci { color: #5b6270; font-size: 11px; white-space: nowrap; }
td.note { text-align: left; color: #8a3b12; font-size: 12px; }
table.prov td { text-align: left; font-family: monospace; font-size: 12px; }
.caption { color: #5b6270; font-size: 13px; margin: 2px 0 8px; } .missing { color: #8a3b12; }
img { max-width: 100%; height: auto; display: block; }
pre { background: #f3f5f8; padding: 10px; font-size: 12px; overflow-x: auto; }
.warn { border: 1px solid #e0a030; background: #fff7e6; padding: 8px 12px; border-radius: 6px; font-size: 13px; }
tr.apart td { background: #fdecea; } .saliency img { max-width: 720px; margin: 8px 0; }
"""


def _overfitting_section(found: dict) -> str:
    """The verdict on the training curves (medtl.evaluate.overfit), in words."""
    rules = (f"Flagged when val AUROC falls while train AUROC rises for {found['patience']} consecutive epochs of a "
             f"phase (evaluate.overfit_patience), or when train AUROC exceeds val AUROC by more than "
             f"{found['gap']:g} at the best or the last epoch (evaluate.overfit_gap). Train AUROC is measured each "
             "epoch on a fixed, un-augmented sample of the train split (train.train_eval_images).")
    if found["note"]:
        body = f"<p class=missing>{html.escape(found['note'])}.</p>"
    elif found["flagged"]:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in found["remedies"])
        body = ("<p class=missing><b>The run overfits.</b> " + " ".join(html.escape(r) + "." for r in found["reasons"])
                + f"</p><p>Remedies this run did not use:</p><ul>{items}</ul>")
    else:
        body = (f"<p>No sign of overfitting: train minus val macro AUROC is {found['gap_at_best']:.3f} at the best "
                f"epoch ({found['best_epoch']}) and {found['gap_at_last']:.3f} at the last; val AUROC fell while "
                f"train AUROC rose for at most {found['longest_divergence']} consecutive epoch(s).</p>")
    curve = found.get("learning_curve")
    if curve:
        body += f"<p>Learning curve ({html.escape(curve['head'])}): {html.escape(curve['verdict'])}.</p>"
    return f'<section id="overfitting"><h2>Overfitting</h2><p class=caption>{html.escape(rules)}</p>{body}</section>'


def render_html(report: dict, figures: dict, config_yaml: str) -> str:
    """The whole page; `figures` maps a section id to base64 PNG (or None when unavailable)."""
    prov, boot, thr = report["provenance"], report["bootstrap"], report["thresholds"]
    ci_text = (f"{boot['confidence']:.0%} intervals from {boot['resamples']} patient-level bootstrap resamples "
               f"(seed {boot['seed']})" if boot["resamples"] else "bootstrap intervals off (evaluate.bootstrap: 0)")
    target = f" (target {thr['target']:.0%})" if thr["policy"] in ("sensitivity", "specificity") else ""
    def ci(m, key):
        c = m.get(f"{key}_ci")
        return f" [{c[0]:.3f}, {c[1]:.3f}]" if c else ""

    macro, micro = report["macro"], report["micro"]
    cards = [(f"{report['split']} images", str(report["n"])), ("patients", str(report["patients"])),
             ("Macro AUROC" + ci(macro, "auroc"), fmt(macro["auroc"])),
             ("Micro AUROC" + ci(micro, "auroc"), fmt(micro["auroc"])),
             ("Macro AUPRC" + ci(macro, "auprc"), fmt(macro["auprc"]))]
    headline = "".join(f"<div class=card><div class=v>{v}</div><div class=k>{html.escape(k)}</div></div>"
                       for k, v in cards)
    figs = [
        ("auroc", "AUROC per label", f"Bars from 0.5 (chance); whiskers: {ci_text}."),
        ("prevalence", "Label prevalence", f"Positives among known labels in {report['split']}, beside train."),
        ("roc", "ROC curves", "The dot is the operating point at the threshold chosen on val."),
        ("pr", "Precision-recall curves", "Dashed: prevalence (a random model). The dot is the operating point."),
        ("calibration", "Reliability diagram", _calibration_caption(report)),
    ]
    extras = {"calibration": _calibration_table(report)}
    body = "\n".join(_figure(sec, title, figures.get(sec), cap, figures.get(f"{sec}_missing", ""), extras.get(sec, ""))
                     for sec, title, cap in figs)
    body += "\n" + _subgroups_section(report) + "\n" + _figure(
        "training", "Training curves", figures.get("training"), "From history.jsonl; dotted lines start a phase. Both "
        "losses are the training loss function (val: on the whole split, un-augmented); train AUROC is on a fixed, "
        "un-augmented train sample.", figures.get("training_missing", ""))
    body += "\n" + _overfitting_section(report["overfitting"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medtl evaluation report: {html.escape(report['split'])}</title>
<style>{STYLE}</style></head><body><main>
<h1>medtl evaluation report</h1>
<p class=caption>Split <b>{html.escape(report['split'])}</b> of {html.escape(str(prov['data records']))},
model {html.escape(str(prov['model']))}. Thresholds: <b>{html.escape(thr['policy'])}</b>{target}, tuned per label on
<b>{html.escape(thr['tuned_on'])}</b>. {html.escape(ci_text)}.</p>
{_pixels_banner(report)}<div class=headline>{headline}</div>
{_links(report)}
<section id="summary"><h2>Summary</h2>
<table><thead><tr><th>label</th><th>n</th><th>masked</th><th>positives</th><th>prevalence</th>
<th>AUROC [CI]</th><th>AUPRC [CI]</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th>
<th>NPV</th><th>F1</th><th>ECE</th><th>note</th></tr></thead>
<tbody>
{_summary_rows(report)}
</tbody></table>
<p class=caption>n: images with a known label; masked: uncertain labels left out of that label's metrics.
Sensitivity to F1 at the val-chosen threshold (probability &ge; threshold is positive).</p></section>
{_phases_section(report.get("phases") or [])}
<section id="provenance"><h2>Provenance</h2><table class=prov>{_provenance_rows(prov)}</table>
<details><summary>resolved config</summary><pre>{html.escape(config_yaml)}</pre></details></section>
{_external_section(report)}
{body}
{_saliency_section(report, figures)}
</main></body></html>
"""


def _phases_section(phases: list[dict]) -> str:
    if not phases:
        return ""
    return ("<section id=\"phases\"><h2>Training phases</h2><table><thead><tr><th>phase</th><th>what trained</th>"
            "<th>epochs</th><th>best val macro AUROC</th></tr></thead><tbody>" + _phase_rows(phases)
            + "</tbody></table><p class=caption>From history.jsonl. A first phase that trains the head only on "
            "the frozen base measures how well the base's features serve this task.</p></section>")


# --------------------------------------------------------------------------- external validation, saliency


def _names_list(names) -> str:
    return ", ".join(html.escape(n) for n in names) if names else "none"


def _external_section(report: dict) -> str:
    """An export on other records: the label mapping, and each label beside the internal test set's."""
    ext = report.get("external")
    if not ext:
        return ""
    internal = ext["internal"]
    conf = f"{report['bootstrap']['confidence']:.0%}"
    if internal:
        about = (f"Internal: the {html.escape(internal['split'])} split of the training data ({internal['n']} images, "
                 f"{internal['patients']} patients, {internal['confidence']:.0%} intervals), from "
                 f"{html.escape(ext['internal_source'])}.")
    else:
        about = f"Internal test result: {html.escape(ext['internal_source'])}."
    rows = []
    for r in ext["rows"]:
        e, i = r["external"], r["internal"] or {}
        diff = r["auroc_difference"]
        rows.append(f"<tr{' class=apart' if r['apart'] else ''}><th>{html.escape(r['label'])}</th>"
                    f"<td class=note>{html.escape(r['records_label'])}</td><td>{e['positives']}/{e['n']}</td>"
                    f"<td>{_with_ci(e['auroc'], e.get('auroc_ci'))}</td><td>{_with_ci(i.get('auroc'), i.get('auroc_ci'))}</td>"
                    f"<td>{'n/a' if diff is None else f'{diff:+.3f}'}</td><td>{_with_ci(e['auprc'], e.get('auprc_ci'))}</td>"
                    f"<td>{_with_ci(i.get('auprc'), i.get('auprc_ci'))}</td>"
                    f"<td>{_pct(e.get('prevalence'))} / {_pct(i.get('prevalence'))}</td></tr>")
    macro = report["macro"]
    same = ext["internal_macro_auroc_same_labels"]
    diff = "n/a" if same is None or macro["auroc"] is None else f"{macro['auroc'] - same:+.3f}"
    rows.append(f"<tr class=avg><th>macro average</th><td class=note>the labels scored</td><td></td>"
                f"<td>{_with_ci(macro['auroc'], macro.get('auroc_ci'))}</td><td>{fmt(same)}</td><td>{diff}</td>"
                f"<td>{_with_ci(macro['auprc'], macro.get('auprc_ci'))}</td><td></td><td></td></tr>")
    return f"""<section id="external"><h2>External validation</h2>
<p class=caption>This model on other records: {html.escape(str(report['provenance']['data records']))}, label map
{html.escape(ext['label_map'] or 'none (the labels match by name)')}. {about} Intervals: {conf} patient-level bootstrap.
Red rows: the two AUROC intervals do not overlap.</p>
<table><thead><tr><th>model label</th><th>records label</th><th>positives/n</th><th>AUROC here [CI]</th>
<th>AUROC internal [CI]</th><th>difference</th><th>AUPRC here [CI]</th><th>AUPRC internal [CI]</th>
<th>prevalence here / internal</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<p class=caption>The internal macro figure here is the mean over the same labels (no interval: the internal bootstrap
is not kept). AUPRC depends on prevalence, which differs between sites.<br>
Model labels not scored: {_names_list(ext['unmapped_model_labels'])}.<br>
Records labels not used: {_names_list(ext['unmapped_records_labels'])}.</p></section>"""


def _pixels_banner(report: dict) -> str:
    if not report.get("saliency"):
        return ""
    return ("<p class=warn><b>This report shows image pixels</b> (Grad-CAM overlays, evaluate.saliency). Pixels can "
            "carry burned-in text such as names, dates or IDs: share it only where the images themselves may go.</p>")


def _saliency_section(report: dict, figures: dict) -> str:
    entry = report.get("saliency")
    if not entry:
        return ""
    n = entry["examples_per_category"]
    images = "".join(f'<img alt="Grad-CAM {html.escape(name)}" src="data:image/png;base64,{png}">'
                     for name, png in (figures.get("saliency") or {}).items())
    return f"""<section id="saliency" class=saliency><h2>Saliency (Grad-CAM)</h2>
<p class=caption>Per label, up to {n} of each: the most confident true positives and false positives, and the
false negatives with the lowest probability, at the val-chosen threshold. The heat map is Grad-CAM on the backbone's
last feature map (red: raises the label's logit most), each cell drawn where it is centred in the image; below its
tenth the image shows through. Each image is named
by its salted record key. A heat map shows where the model looks, not why, and it is coarse: the feature map
has one cell per 32 pixels of the model's input ({html.escape(str(report['provenance']['model']))}).</p>
<p class=warn>These images are pixels from the records: they can carry burned-in text.</p>
{images}</section>"""


def build_figures(report: dict, preds: dict, label_names, train_prevalence: dict | None,
                  history: list[dict] | None) -> dict:
    """Every plot of the report, as base64 PNG by section id."""
    y, probs = preds["labels"], preds["probs"]
    keep = preds["mask"] > 0
    labels = report["labels"]
    figures = {
        "auroc": plots.auroc_bars(label_names, labels, report["macro"], report["bootstrap"]["confidence"]),
        "prevalence": plots.prevalence_bars(label_names, report["split"], labels, train_prevalence),
        "roc": plots.roc_grid(y, probs, keep, label_names, labels),
        "pr": plots.pr_grid(y, probs, keep, label_names, labels),
        "calibration": plots.reliability_grid(y, probs, keep, label_names, labels, report["calibration_bins"],
                                              report["micro"]["ece"], _before(report, preds)),
    }
    if history:
        figures["training"] = plots.training_curves(history)
    else:
        figures["training"] = None
        figures["training_missing"] = "No training history: this model has no history.jsonl beside it."
    return figures


def _before(report: dict, preds: dict) -> dict | None:
    """The uncalibrated probabilities and their ECEs, for the reliability diagram's before curves."""
    cal = report.get("calibration") or {"method": "none"}
    if cal["method"] == "none" or "raw_probs" not in preds:
        return None
    return {"probs": preds["raw_probs"], "ece": {n: r["ece_before"] for n, r in cal["labels"].items()},
            "pooled_ece": cal["micro"]["ece_before"]}


# --------------------------------------------------------------------------- metrics.json read back


@dataclass(frozen=True)
class ReportSummary:
    """What the model card takes from a report's metrics.json."""

    folder: str
    split: str
    images: int
    patients: int
    checkpoint_sha256: str
    evaluated_at: str
    confidence: float
    resamples: int
    labels: dict  # label -> {"auroc", "auroc_ci", "auprc", "auprc_ci", "positives", "n", "threshold", "ece", "note"}
    macro: dict
    micro: dict
    calibration: dict  # {"method": "none"} or calibration_summary's content
    subgroups: dict | None  # medtl.evaluate.subgroups.analyse's content


def read_summary(folder: str) -> ReportSummary:
    """A report folder's metrics.json as a ReportSummary (reports older than calibration say "none")."""
    with open(os.path.join(folder, METRICS_FILE), encoding="utf-8") as fh:
        raw = json.load(fh)
    keys = ("auroc", "auroc_ci", "auprc", "auprc_ci", "positives", "n", "threshold", "ece", "note")
    return ReportSummary(
        folder=folder, split=raw["split"], images=raw["n"], patients=raw["patients"],
        checkpoint_sha256=raw.get("checkpoint_sha256", ""),
        evaluated_at=raw["provenance"].get("evaluated at (UTC)", ""), confidence=raw["bootstrap"]["confidence"],
        resamples=raw["bootstrap"]["resamples"],
        labels={n: {k: r.get(k) for k in keys} for n, r in raw["labels"].items()}, macro=raw["macro"],
        micro=raw["micro"], calibration=raw.get("calibration") or {"method": "none"}, subgroups=raw.get("subgroups"))
