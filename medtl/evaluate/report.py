"""`medtl evaluate`: metrics.json and a self-contained report.html (inline PNG plots)."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os

import numpy as np

import medtl
from medtl import dist
from medtl.evaluate.metrics import summary_metrics
from medtl.evaluate.predict import predict_split
from medtl.utils.log import log


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _roc_grid(y, probs, mask, label_names, summary) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    cols = 4
    rows = int(np.ceil(len(label_names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for i, name in enumerate(label_names):
        ax = axes[i // cols][i % cols]
        keep = mask[:, i] > 0
        row = summary["labels"][name]
        if row["auroc"] is not None:
            fpr, tpr, _ = roc_curve(y[keep, i], probs[keep, i])
            ax.plot(fpr, tpr, lw=1.6)
            ax.set_title(f"{name}\nAUROC {row['auroc']:.3f}", fontsize=9)
        else:
            ax.text(0.5, 0.5, row["note"], ha="center", va="center", fontsize=8)
            ax.set_title(name, fontsize=9)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 - specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
    for j in range(len(label_names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return _png(fig)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_html(summary: dict, provenance: dict, roc_png: str) -> str:
    rows = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['n']}</td><td>{r['positives']}</td>"
        f"<td>{_fmt(r['prevalence'])}</td><td>{_fmt(r['auroc'])}</td><td>{_fmt(r['auprc'])}</td>"
        f"<td>{html.escape(r['note'])}</td></tr>"
        for name, r in summary["labels"].items()
    )
    prov = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                     for k, v in provenance.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medtl evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }}
th {{ background: #f4f4f4; }}
.big {{ font-size: 20px; }}
</style></head><body>
<h1>medtl evaluation report</h1>
<section id="summary"><h2>Summary</h2>
<p class="big">Split <b>{html.escape(provenance['split'])}</b>, {summary['n']} images.
Macro AUROC <b>{_fmt(summary['macro']['auroc'])}</b>, micro AUROC {_fmt(summary['micro']['auroc'])};
macro AUPRC {_fmt(summary['macro']['auprc'])}, micro AUPRC {_fmt(summary['micro']['auprc'])}.</p>
<table><tr><th>label</th><th>n</th><th>positives</th><th>prevalence</th><th>AUROC</th><th>AUPRC</th><th>note</th></tr>
{rows}
</table></section>
<section id="roc"><h2>ROC curves</h2><img alt="ROC curves per label" src="data:image/png;base64,{roc_png}"></section>
<section id="provenance"><h2>Provenance</h2><table>{prov}</table></section>
</body></html>
"""


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_run(workdir: str, split: str, out: str) -> dict:
    """Predict `split` with the run's best model; write metrics.json and report.html into `out`."""
    from medtl.train.checkpoints import load_run

    ctx = dist.init()
    cfg, manifest, model = load_run(workdir)
    log(f"evaluate: predicting split {split!r} with {workdir}")
    preds = predict_split(model, cfg, manifest, split, ctx)
    label_names = manifest["labels"]
    summary = summary_metrics(preds["labels"], preds["probs"], label_names, preds["mask"])
    if not ctx.primary:
        return summary
    os.makedirs(out, exist_ok=True)
    provenance = {
        "split": split,
        "run": os.path.abspath(workdir),
        "checkpoint": "checkpoints/best.weights.h5",
        "backbone": cfg.model.backbone,
        "image size": cfg.data.image_size,
        "data manifest sha256": manifest_hash(manifest),
        "medtl version": medtl.__version__,
    }
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump({**summary, "provenance": provenance}, fh, indent=2)
    page = render_html(summary, provenance, _roc_grid(preds["labels"], preds["probs"], preds["mask"],
                                                      label_names, summary))
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as fh:
        fh.write(page)
    log(f"evaluate: macro AUROC {_fmt(summary['macro']['auroc'])} on {summary['n']} {split} images; "
        f"report {os.path.join(out, 'report.html')}")
    return summary
