"""Every figure medtl draws (matplotlib, Agg): the evaluation report's and the head search's,
each returned as base64 PNG for inline <img> tags. The one module that imports matplotlib."""
from __future__ import annotations

import base64
import io
import math

import numpy as np

COLOR = "#1f5fa8"
ACCENT = "#d1495b"
MUTED = "#8a8f98"
GRID_COLUMNS = 4


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titleweight": "bold", "figure.dpi": 100})
    return plt


def to_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(count: int, panel=(2.7, 2.6)):
    plt = _plt()
    rows = int(np.ceil(count / GRID_COLUMNS))
    fig, axes = plt.subplots(rows, GRID_COLUMNS, figsize=(panel[0] * GRID_COLUMNS, panel[1] * rows),
                             squeeze=False)
    for j in range(count, rows * GRID_COLUMNS):
        axes[j // GRID_COLUMNS][j % GRID_COLUMNS].axis("off")
    return fig, [axes[i // GRID_COLUMNS][i % GRID_COLUMNS] for i in range(count)]


def _na(ax, title: str, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", color=MUTED, transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def roc_grid(y, probs, keep, label_names, labels: dict) -> str:
    """Per-label ROC curves with the operating point (val-chosen threshold) marked."""
    from sklearn.metrics import roc_curve

    fig, axes = _grid(len(label_names))
    for i, (ax, name) in enumerate(zip(axes, label_names)):
        row = labels[name]
        if row["auroc"] is None:
            _na(ax, name, row["note"])
            continue
        fpr, tpr, _ = roc_curve(y[keep[:, i], i], probs[keep[:, i], i])
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=MUTED)
        ax.plot(fpr, tpr, lw=1.6, color=COLOR)
        ax.plot(1 - row["specificity"], row["sensitivity"], "o", color=ACCENT, ms=6,
                label=f"t={row['threshold']:.3f}")
        ax.set_title(f"{name}  AUROC {row['auroc']:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    fig.tight_layout()
    return to_png(fig)


def pr_grid(y, probs, keep, label_names, labels: dict) -> str:
    """Per-label precision-recall curves, prevalence as the chance line, operating point marked."""
    from sklearn.metrics import precision_recall_curve

    fig, axes = _grid(len(label_names))
    for i, (ax, name) in enumerate(zip(axes, label_names)):
        row = labels[name]
        if row["auprc"] is None:
            _na(ax, name, row["note"])
            continue
        precision, recall, _ = precision_recall_curve(y[keep[:, i], i], probs[keep[:, i], i])
        ax.axhline(row["prevalence"], ls="--", lw=0.8, color=MUTED)
        ax.plot(recall, precision, lw=1.6, color=COLOR, drawstyle="steps-post")
        if row["ppv"] is not None:
            ax.plot(row["sensitivity"], row["ppv"], "o", color=ACCENT, ms=6, label=f"t={row['threshold']:.3f}")
            ax.legend(loc="lower left", fontsize=7, frameon=False)
        ax.set_title(f"{name}  AUPRC {row['auprc']:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    fig.tight_layout()
    return to_png(fig)


def reliability_grid(y, probs, keep, label_names, labels: dict, bins: int, pooled_ece, before: dict | None = None) -> str:
    """Reliability diagrams: per label, and all labels pooled; marker area ~ images in the bin. With `before`
    ({'probs', 'ece' per label, 'pooled_ece'}: the uncalibrated probabilities), their curve is drawn in grey."""
    from medtl.models.metrics import calibration_bins

    raw = None if before is None else before["probs"]
    panels = [(name, y[keep[:, i], i], probs[keep[:, i], i], labels[name]["ece"],
               None if raw is None else (raw[keep[:, i], i], before["ece"][name])) for i, name in enumerate(label_names)]
    panels.append(("all labels (pooled)", y[keep], probs[keep], pooled_ece,
                   None if raw is None else (raw[keep], before["pooled_ece"])))
    fig, axes = _grid(len(panels))
    for ax, (name, yi, pi, ece, old) in zip(axes, panels):
        if len(yi) == 0:
            _na(ax, name, "n/a: no known labels")
            continue
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=MUTED)
        curves = ([(old[0], MUTED)] if old is not None else []) + [(pi, COLOR)]
        for values, color in curves:
            b = calibration_bins(yi, values, bins)
            full = b["count"] > 0
            ax.plot(b["mean_predicted"][full], b["fraction_positive"][full], lw=1.2, color=color)
            sizes = 12 + 120 * b["count"][full] / b["count"].max()
            ax.scatter(b["mean_predicted"][full], b["fraction_positive"][full], s=sizes, color=color, zorder=3)
        title = name if ece is None else f"{name}  ECE {ece:.3f}"
        if old is not None and ece is not None and old[1] is not None:
            title = f"{name}  ECE {old[1]:.3f}\u2192{ece:.3f}"
        ax.set_title(title)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="mean predicted probability", ylabel="fraction positive")
    fig.tight_layout()
    return to_png(fig)


def auroc_bars(label_names, labels: dict, macro: dict, confidence: float) -> str:
    """AUROC per label with its bootstrap interval; the macro average as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(label_names) + 1.2))
    pos = np.arange(len(label_names))[::-1]
    for p, name in zip(pos, label_names):
        row = labels[name]
        if row["auroc"] is None:
            ax.text(0.51, p, row["note"], va="center", color=MUTED)
            continue
        ci = row.get("auroc_ci")
        err = None if ci is None else [[row["auroc"] - ci[0]], [ci[1] - row["auroc"]]]
        ax.barh(p, row["auroc"] - 0.5, left=0.5, color=COLOR, height=0.6, alpha=0.85)
        ax.errorbar(row["auroc"], p, xerr=err, fmt="none", ecolor="#222", capsize=3, lw=1)
        ax.text(1.005, p, f"{row['auroc']:.3f}", va="center", fontsize=8)
    if macro.get("auroc") is not None:
        ax.axvline(macro["auroc"], color=ACCENT, lw=1.2, ls="--", label=f"macro {macro['auroc']:.3f}")
        ax.legend(loc="lower left", frameon=False)
    lows = [v for n in label_names for v in [labels[n]["auroc"], *(labels[n].get("auroc_ci") or [])]
            if v is not None]
    left = min([0.5, *lows])
    ax.axvline(0.5, color=MUTED, lw=0.8)
    ax.set_yticks(pos, label_names)
    ax.set(xlim=(np.floor(left * 10) / 10, 1.0), xlabel=f"AUROC ({confidence:.0%} bootstrap interval)")
    fig.tight_layout()
    return to_png(fig)


def prevalence_bars(label_names, split: str, labels: dict, train_prevalence: dict | None) -> str:
    """Positive rate of each label in the evaluated split, beside the train split's."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(label_names) + 1.2))
    pos = np.arange(len(label_names))[::-1]
    here = [labels[n]["prevalence"] or 0.0 for n in label_names]
    height = 0.38 if train_prevalence else 0.6
    ax.barh(pos + (height / 2 if train_prevalence else 0), here, height=height, color=COLOR, label=split)
    for p, v in zip(pos, here):
        ax.text(v + 0.003, p + (height / 2 if train_prevalence else 0), f"{v:.1%}", va="center", fontsize=8)
    if train_prevalence:
        train = [train_prevalence.get(n) or 0.0 for n in label_names]
        ax.barh(pos - height / 2, train, height=height, color=MUTED, label="train")
    ax.set_yticks(pos, label_names)
    ax.set_xlabel("prevalence (positives / known labels)")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.legend(loc="lower right", frameon=False)
    fig.tight_layout()
    return to_png(fig)


def training_curves(rows: list[dict]) -> str:
    """Loss, macro AUROC (train sample and val) and learning rate per epoch from history.jsonl, phases marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1))
    epochs = [r["epoch"] + 1 for r in rows]
    loss_name = rows[-1].get("loss_name")  # absent in runs whose val loss was plain BCE
    series = [("loss", f"train loss ({loss_name or 'training loss'})", COLOR),
              ("val_loss", f"val loss ({loss_name or 'BCE'})", ACCENT)]
    for key, name, color in series:
        axes[0].plot(epochs, [r.get(key) for r in rows], "o-", ms=3, color=color, label=name)
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend(frameon=False)
    if any(r.get("train_auroc") is not None for r in rows):
        axes[1].plot(epochs, [r.get("train_auroc") for r in rows], "o--", ms=3, color=MUTED, label="train sample")
    axes[1].plot(epochs, [r.get("val_auroc") for r in rows], "o-", ms=3, color=COLOR, label="val")
    axes[1].set(title="macro AUROC", xlabel="epoch")
    axes[1].legend(frameon=False)
    axes[2].plot(epochs, [r.get("lr") for r in rows], "o-", ms=3, color=COLOR)
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    starts = [(r["epoch"] + 1, r["phase"]) for k, r in enumerate(rows) if k == 0 or r["phase"] != rows[k - 1]["phase"]]
    for ax in axes:
        for epoch, phase in starts:
            ax.axvline(epoch - 0.5, color=MUTED, lw=0.8, ls=":")
            ax.text(epoch - 0.4, 0.98, phase, transform=ax.get_xaxis_transform(), fontsize=7, color=MUTED,
                    va="top", rotation=90)
    fig.tight_layout()
    return to_png(fig)


def search_progress(rows: list[dict], rungs: tuple[int, ...], full_epochs: int) -> str:
    """A head search: each trial's last val AUROC against the cumulative cost when it ended, by rung reached."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ordered = sorted(rows, key=lambda r: r["trial"])
    cost, xs = 0.0, []
    for r in ordered:
        cost += r["cost_full_trainings"]
        xs.append(cost)
    colors = [COLOR, "#3fa34d", "#e0a030", ACCENT, "#7b4fa0", MUTED]
    for i, rung in enumerate(rungs):
        sel = [(x, r["val_auroc_last"]) for x, r in zip(xs, ordered) if r["epochs"] >= rung and
               (i + 1 == len(rungs) or r["epochs"] < rungs[i + 1])]
        if sel:
            ax.scatter(*zip(*sel), s=18, color=colors[i % len(colors)], label=f"stopped at rung {i + 1} ({rung} ep)")
    best, line = -math.inf, []
    for x, r in zip(xs, ordered):
        if r["epochs"] == full_epochs:
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


def search_importances(importances: dict[str, float]) -> str:
    """A head search: each searched parameter's importance, as horizontal bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color=COLOR)
    ax.set_xlabel("importance (fANOVA, first-rung val AUROC)")
    return to_png(fig)


def search_rank_agreement(rankings: dict[float, list[str]], reference: float) -> str:
    """Subset transfer: each head's rank at each smaller fraction against its rank at the largest."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ref = rankings[reference]
    colors = [COLOR, "#3fa34d", "#e0a030", "#7b4fa0", MUTED]
    others = [f for f in sorted(rankings) if f != reference]
    for i, fraction in enumerate(others):
        pairs = [(ref.index(h) + 1, rankings[fraction].index(h) + 1) for h in ref if h in rankings[fraction]]
        if pairs:
            ax.scatter(*zip(*pairs), s=20, color=colors[i % len(colors)], label=f"fraction {fraction:g}")
    top = max(len(ref), 1)
    ax.plot([1, top], [1, top], color=MUTED, lw=0.8, ls=":")
    ax.set_xlabel(f"rank at fraction {reference:g} (1 = best)")
    ax.set_ylabel("rank at the smaller fraction")
    ax.invert_xaxis()
    ax.invert_yaxis()
    if others:
        ax.legend(fontsize=7, frameon=False)
    return to_png(fig)


def learning_curve(fractions: list[float], aurocs: list[float], head: str) -> str:
    """Val macro AUROC of one head against the fraction of the training data (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(fractions, aurocs, "o-", color=COLOR)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the train split (patients)")
    ax.set_ylabel("val macro AUROC")
    ax.set_title(head if len(head) < 70 else head[:67] + "...", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def saliency_grid(label: str, panels: dict, categories, columns: int) -> str:
    """One label's Grad-CAM overlays: a row per category, up to `columns` images, each (rgb, caption)."""
    plt = _plt()
    fig, axes = plt.subplots(len(categories), columns, figsize=(1.55 * columns + 1.1, 1.75 * len(categories)),
                             squeeze=False)
    for r, category in enumerate(categories):
        items = panels.get(category) or []
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(items):
                rgb, caption = items[c]
                ax.imshow(rgb, interpolation="nearest")
                ax.set_xlabel(caption, fontsize=6)
            elif c == 0:
                ax.text(0.5, 0.5, f"no {category}s", ha="center", va="center", color=MUTED,
                        transform=ax.transAxes)
        axes[r][0].set_ylabel(category, fontsize=8, fontweight="bold")
    fig.suptitle(label, fontweight="bold", fontsize=10)
    fig.tight_layout()
    return to_png(fig)
