"""`medtl bench search`: what the feature cache buys, and what the budgeted search loses, in one run.

1. Feature extraction: seconds to fill the cache (train + val) from scratch.
2. One head trial (the base config's head, --trial-epochs epochs) on cached features against the
   same trial with the frozen base run on the images every epoch. Goal: >= 20x faster.
3. A search with a budget of N/4 full trainings against training all N heads of the space for the
   full schedule on the cache: the selected head's exhaustive val AUROC must be within 0.01 of the
   exhaustive best.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from medtl.config import Config
from medtl.utils.log import log


def _time_trial(fn, *args) -> tuple[float, list[float]]:
    start = time.perf_counter()
    history = fn(*args, lambda epoch, auroc: True)
    return time.perf_counter() - start, history


def exhaustive(cfg: Config, space, manifest, train, val, index) -> dict[str, dict]:
    """Every head of the space trained for the full schedule on the cache: key -> {auroc, seconds}."""
    from medtl.search.trial import train_on_cache
    from medtl.utils.progress import Progress

    results = {}
    grid = space.grid()
    with Progress(len(grid), "exhaustive", unit="heads") as bar:
        for params in grid:
            head = space.head(params)
            seconds, history = _time_trial(train_on_cache, cfg, head, manifest, train, val, index["feature_shape"],
                                           bool(index["meta"]["pooled"]), cfg.phases[0].epochs)
            results[head.key()] = {"auroc": history[-1], "seconds": seconds}
            bar(1)
    return results


def run(cfg: Config, space_path: str, records: str | None, n: int, trial_epochs: int, budget: float | None,
        keep: str | None) -> dict:
    from medtl import dist
    from medtl.bench.train import _records
    from medtl.data.manifest import read_manifest
    from medtl.search.cache import ensure_cache, load_split
    from medtl.search.run import run_search
    from medtl.search.space import Head, defaults_from, load_space
    from medtl.search.trial import train_on_cache, train_with_base

    root = keep or tempfile.mkdtemp(prefix="medtl-bench-search-")
    records = records or _records(root, cfg, n)
    manifest = read_manifest(records)
    features = os.path.join(root, "features")
    shutil.rmtree(features, ignore_errors=True)  # extraction is measured from scratch
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, records=records),
                              search=dataclasses.replace(cfg.search, feature_cache=features))
    space = load_space(space_path, defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name))
    ctx = dist.init()

    start = time.perf_counter()
    folder, index, _ = ensure_cache(cfg, manifest, ctx)
    extraction = time.perf_counter() - start
    train, val = load_split(folder, index, "train"), load_split(folder, index, "val")

    head = Head(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name)
    log(f"bench search: one trial of {trial_epochs} epoch(s), {head.key()}, on the cache and with the frozen base")
    cached_s, cached_h = _time_trial(train_on_cache, cfg, head, manifest, train, val, index["feature_shape"],
                                     bool(index["meta"]["pooled"]), trial_epochs)
    base_s, base_h = _time_trial(train_with_base, cfg, head, manifest, trial_epochs)

    budget = budget if budget is not None else space.size / 4
    workdir = os.path.join(root, "search")
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"bench search: search with a budget of {budget:g} full trainings")
    start = time.perf_counter()
    summary = run_search(cfg, space_path, budget, workdir)
    search_s = time.perf_counter() - start
    log(f"bench search: all {space.size} heads for the full {cfg.phases[0].epochs} epochs on the cache")
    start = time.perf_counter()
    every = exhaustive(cfg, space, manifest, train, val, index)
    exhaustive_s = time.perf_counter() - start
    best_key = max(every, key=lambda k: every[k]["auroc"])
    chosen = summary["best"]["head"]
    gap = every[best_key]["auroc"] - every[chosen]["auroc"]
    better = sum(v["auroc"] > every[chosen]["auroc"] for v in every.values())

    lines = [
        f"bench search: {cfg.model.backbone} {cfg.data.image_size} px, weights {cfg.model.weights}, "
        f"{index['images']['train']} train / {index['images']['val']} val images, batch {cfg.train.batch_size}, "
        f"{os.cpu_count()} CPU cores, feature shape {tuple(index['feature_shape'])}",
        f"  feature extraction (train + val, once):       {extraction:8.1f} s",
        f"  trial on cached features ({trial_epochs} epochs):         {cached_s:8.2f} s  "
        f"(val AUROC {cached_h[-1]:.4f})",
        f"  same trial, frozen base run every epoch:      {base_s:8.2f} s  (val AUROC {base_h[-1]:.4f})",
        f"  ratio base-in-loop / cache: {base_s / cached_s:.1f}x (goal >= 20x)",
        f"  search, budget {budget:g} full trainings: explored {summary['explored']} of {space.size} heads, spent "
        f"{summary['spent_full_trainings']:.2f} full trainings, {search_s:.1f} s",
        f"  exhaustive, {space.size} heads x {cfg.phases[0].epochs} epochs ({space.size} full trainings): "
        f"{exhaustive_s:.1f} s",
        f"  selected {chosen}: exhaustive val AUROC {every[chosen]['auroc']:.4f} (rank {better + 1} of {space.size})",
        f"  exhaustive best {best_key}: {every[best_key]['auroc']:.4f}",
        f"  gap {gap:.4f} (goal <= 0.01)",
    ]
    print("\n".join(lines))
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return {"extraction": extraction, "ratio": base_s / cached_s, "gap": gap, "explored": summary["explored"]}
