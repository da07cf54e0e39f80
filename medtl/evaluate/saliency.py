"""The report's Grad-CAM section (evaluate.saliency): per label, the most confident true and false
positives and the most confidently missed positives at the operating threshold, each map over its image.

Rank 0 picks the records from the gathered predictions, reads their images from the split again, and
asks the source for their maps (a run's Keras model, or an export's saliency signature).
"""
from __future__ import annotations

import numpy as np

from medtl.data.pipeline import build_dataset, pipeline_errors
from medtl.evaluate import plots
from medtl.models.saliency import overlay

CATEGORIES = ("true positive", "false positive", "false negative")
MAP_BATCH = 16


def pick_examples(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, thresholds, n: int) -> list[dict]:
    """Per label, {category: record indices}: true and false positives by falling probability, false
    negatives by rising probability (the surest first), at most n each; masked labels never count."""
    picked = []
    for k, threshold in enumerate(thresholds):
        known, y, p = mask[:, k] > 0, labels[:, k] > 0.5, probs[:, k]
        called = p >= threshold
        groups = {"true positive": known & y & called, "false positive": known & ~y & called,
                  "false negative": known & y & ~called}
        picked.append({name: [int(i) for i in sorted(np.flatnonzero(sel), key=lambda i: (
            -p[i] if name != "false negative" else p[i], i))[:n]] for name, sel in groups.items()})
    return picked


def read_images(source, split: str, keys: set[str]) -> dict[str, np.ndarray]:
    """{record key: (size, size, c) model input in [0, 255]} for the given salted keys of `split`."""
    ds = build_dataset(source.cfg, split, 0, 1, source.manifest, training=False, with_ids=True)
    found: dict[str, np.ndarray] = {}
    with pipeline_errors():
        for batch in ds:
            for image, key in zip(batch[0].numpy(), batch[4].numpy()):
                key = key.decode("ascii")
                if key in keys:
                    found[key] = image
            if len(found) == len(keys):
                break
    return found


def saliency_section(source, split: str, preds: dict, report: dict) -> tuple[dict, dict]:
    """(metrics.json's 'saliency' entry, {"saliency": {label: base64 PNG}}) for the report."""
    label_names = list(source.label_names)
    n = source.cfg.evaluate.saliency_examples
    thresholds = [report["labels"][name]["threshold"] for name in label_names]
    picked = pick_examples(preds["probs"], preds["labels"], preds["mask"], thresholds, n)
    rows = sorted({i for per_label in picked for ids in per_label.values() for i in ids})
    keys = [str(preds["key"][i]) for i in rows]
    images = read_images(source, split, set(keys))
    stack = np.stack([images[k] for k in keys]) if keys else np.zeros((0, 1, 1, 1), np.float32)
    maps = np.concatenate([np.asarray(source.saliency(stack[s:s + MAP_BATCH]))
                           for s in range(0, len(stack), MAP_BATCH)]) if keys else stack
    at = {i: j for j, i in enumerate(rows)}
    entry, figures = {"examples_per_category": n, "labels": {}}, {}
    for k, name in enumerate(label_names):
        panels, listed = {}, {}
        for category in CATEGORIES:
            ids = picked[k][category]
            listed[category] = [{"key": str(preds["key"][i]), "probability": float(preds["probs"][i, k])}
                                for i in ids]
            panels[category] = [(overlay(stack[at[i]], maps[at[i]][..., k]),
                                 f"p {preds['probs'][i, k]:.3f}\n{preds['key'][i]}") for i in ids]
        entry["labels"][name] = {"threshold": thresholds[k], **listed}
        figures[name] = plots.saliency_grid(name, panels, CATEGORIES, n)
    return entry, {"saliency": figures}
