"""`medtl bench search`: what the feature cache buys, and what the budgeted search loses, in one run.

On a pretrained base only (random features make every head a coin toss, so a ranking says nothing): the
base is `--base`, or the config's `model.weights`, or pretrained here first on a synthetic archive (the
demo's: other findings, other patients; `--pretrain-config`).

1. Feature extraction: seconds to fill the cache (train + val) from scratch.
2. One head trial (the base config's head, --trial-epochs epochs) on cached features against the
   same trial with the frozen base run on the images every epoch. Goal: >= 20x faster.
3. For each of `--seeds`: a search with a budget of N/4 full trainings against training all N heads of
   the space for the full schedule on the cache: the selected head's exhaustive val AUROC must be within
   0.01 of the exhaustive best.
4. Subset transfer (`--fraction`): the same exhaustive pass on a nested, patient-level subset of the train
   split; Kendall's tau between its ranking and the full data's, and how far the subset's best head is from
   the full data's best on the full data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

from medtl.utils import fs
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
            results[head.key()] = {"auroc": history[-1], "seconds": seconds, "history": list(history)}
            bar(1)
    return results


GOAL_GAP = 0.01
# Successive-halving schedules replayed on the exhaustive curves: (search.min_epochs, search.reduction_factor).
SCHEDULES = ((1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (3, 3))
REPLAY_DRAWS = 2000


def replay_schedules(cfg: Config, space, every: dict[str, dict], budget: float, seed: int) -> list[dict]:
    """What each of SCHEDULES would pick with `budget` full trainings, replayed on the exhaustive pass's
    per-epoch val AUROC curves (every head trains the same way in a search and in the exhaustive pass): the
    plan's n heads drawn at random REPLAY_DRAWS times, halved synchronously at each rung by their AUROC there,
    and the first rung's failed starts given their second look (search.second_look_below; its epoch is not
    charged to the budget here). An approximation of `medtl search` (asynchronous halving, a grid sampler),
    not a search; it costs no training."""
    import numpy as np

    from medtl.search.run import plan_search

    keys = sorted(every)
    curves = np.array([every[k]["history"] for k in keys])  # (heads, epochs)
    final, best = curves[:, -1], curves[:, -1].max()
    rng = np.random.default_rng(seed)
    rows = []
    for r, eta in SCHEDULES:
        if r > cfg.phases[0].epochs:
            continue
        plan = plan_search(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, min_epochs=r,
                                                                               reduction_factor=eta)), space, budget)
        gaps = []
        for _ in range(REPLAY_DRAWS):
            alive = rng.choice(len(keys), size=plan.trials, replace=False)
            for i, rung in enumerate(plan.rungs[:-1]):
                keep = max(1, len(alive) // eta)
                order = alive[np.argsort(-curves[alive, rung - 1], kind="stable")]
                alive = order[:keep]
                if i == 0:
                    alive = np.concatenate([alive, _second_looks(curves, order, keep, rung, plan.rungs[1], eta,
                                                                 cfg.search.second_look_below)])
            gaps.append(best - final[alive].max())
        gaps = np.array(gaps)
        rows.append({"min_epochs": r, "reduction_factor": eta, "trials": plan.trials, "rungs": list(plan.rungs),
                     "within_goal": float(np.mean(gaps <= GOAL_GAP)), "mean_gap": float(gaps.mean())})
    return rows


def _second_looks(curves, order, keep: int, rung: int, next_rung: int, eta: int, below: float):
    """The heads of `order` (ranked at the first rung) past the first `keep` that were failed starts there and
    pass their second look: one epoch later, against the first rung's other scores, or at the next rung itself
    when that is the following epoch (then they go on to be judged there)."""
    import numpy as np

    from medtl.search.run import failed_starts, promotable

    first = {int(h): float(curves[h, rung - 1]) for h in order}
    kept = set(order[:keep].tolist())
    looked = [h for h in failed_starts(first, below) if h not in kept]
    if next_rung == rung + 1:
        return np.array(looked, dtype=order.dtype)
    return np.array([h for h in looked if promotable(float(curves[h, rung]), [v for k, v in first.items() if k != h],
                                                     eta)], dtype=order.dtype)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2): distinct integers."""
    from medtl.errors import MedtlError

    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MedtlError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise MedtlError(f"--seeds {text!r}: give one or more distinct integers, e.g. 0,1,2")
    return seeds


def _base(cfg: Config, pre_cfg: Config | None, base: str | None, archive: str | None, root: str) -> str:
    """The pretrained base file the heads sit on: --base, model.weights, or pretrained here on `archive`."""
    from medtl import api
    from medtl.errors import MedtlError

    if base:
        return base
    if cfg.model.weights != "none":
        return cfg.model.weights
    if archive is None or pre_cfg is None:
        raise MedtlError("bench search compares heads on a pretrained base, not on random weights: pass --base FILE "
                         "(from `medtl pretrain`), set model.weights, or pass --archive RECORDS to pretrain one "
                         "(without --records, a synthetic archive is made)")
    pre_cfg = dataclasses.replace(pre_cfg, data=dataclasses.replace(pre_cfg.data, records=archive,
                                                                    image_size=cfg.data.image_size),
                                  model=dataclasses.replace(pre_cfg.model, backbone=cfg.model.backbone))
    log(f"bench search: pretraining the {cfg.model.backbone} base on {archive} ({pre_cfg.pretrain.method})")
    return api.pretrain(pre_cfg, os.path.join(root, "base")).base_weights


def _ranking(scores: dict[str, dict]) -> list[str]:
    return sorted(scores, key=lambda k: (-scores[k]["auroc"], k))


def run(cfg: Config, space_path: str, records: str | None, n: int, trial_epochs: int, budget: float | None,
        keep: str | None, seeds: tuple[int, ...] = (0,), fraction: float | None = 0.25, base: str | None = None,
        pre_cfg: Config | None = None, archive: str | None = None, archive_n: int = 3000) -> dict:
    from medtl import dist
    from medtl.data.manifest import read_manifest
    from medtl.data.subsets import select_subsets
    from medtl.demo import prepare_records
    from medtl.search.cache import ensure_cache, load_split
    from medtl.search.run import run_search
    from medtl.search.space import Head, defaults_from, load_space
    from medtl.search.transfer import compare_rankings
    from medtl.search.trial import train_on_cache, train_with_base

    root = keep or tempfile.mkdtemp(prefix="medtl-bench-search-")
    if records is None:
        archive_default, records = prepare_records(root, n, archive_n, cfg.seed, cfg.data.image_size,
                                                   cfg.data.image_size, "bench search")
        archive = archive or archive_default
    weights = _base(cfg, pre_cfg, base, archive, root)
    manifest = read_manifest(records)
    features = os.path.join(root, "features")
    shutil.rmtree(features, ignore_errors=True)  # extraction is measured from scratch
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, records=records),
                              model=dataclasses.replace(cfg.model, weights=weights),
                              search=dataclasses.replace(cfg.search, feature_cache=features, fractions=()))
    space = load_space(space_path, defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name))
    ctx = dist.init()

    start = time.perf_counter()
    folder, index, _ = ensure_cache(cfg, manifest, ctx)
    extraction = time.perf_counter() - start
    train, val = load_split(folder, index, "train"), load_split(folder, index, "val")
    shape, pooled = index["feature_shape"], bool(index["meta"]["pooled"])

    head = Head(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name)
    log(f"bench search: one trial of {trial_epochs} epoch(s), {head.key()}, on the cache and with the frozen base")
    cached_s, cached_h = _time_trial(train_on_cache, cfg, head, manifest, train, val, shape, pooled, trial_epochs)
    base_s, base_h = _time_trial(train_with_base, cfg, head, manifest, trial_epochs)

    budget = budget if budget is not None else space.size / 4
    subset = None
    if fraction is not None and fraction < 1.0:
        subset = select_subsets(train.patients, train.labels, train.mask, (fraction,), cfg.seed, manifest.labels,
                                where="--fraction")[fraction]
    per_seed = []
    for seed in seeds:
        seeded = dataclasses.replace(cfg, seed=seed)
        workdir = os.path.join(root, f"search-seed{seed}")
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"bench search: seed {seed}: search with a budget of {budget:g} full trainings")
        start = time.perf_counter()
        summary = run_search(seeded, space_path, budget, workdir)
        search_s = time.perf_counter() - start
        log(f"bench search: seed {seed}: all {space.size} heads for the full {cfg.phases[0].epochs} epochs")
        start = time.perf_counter()
        every = exhaustive(seeded, space, manifest, train, val, index)
        exhaustive_s = time.perf_counter() - start
        best_key, chosen = _ranking(every)[0], summary["best"]["head"]
        row = {"seed": seed, "explored": summary["explored"], "second_looks": summary["second_looks"],
               "spent": summary["spent_full_trainings"],
               "search_s": search_s, "exhaustive_s": exhaustive_s, "chosen": chosen,
               "chosen_auroc": every[chosen]["auroc"], "rank": 1 + sum(v["auroc"] > every[chosen]["auroc"]
                                                                     for v in every.values()),
               "best": best_key, "best_auroc": every[best_key]["auroc"],
               "gap": every[best_key]["auroc"] - every[chosen]["auroc"], "scores": every,
               "replay": replay_schedules(seeded, space, every, budget, seed)}
        if subset is not None:
            log(f"bench search: seed {seed}: all {space.size} heads on {fraction:g} of the train split "
                f"({subset.images} images of {subset.patients} patients)")
            part = exhaustive(seeded, space, manifest, train.select(subset.rows), val, index)
            agreement = compare_rankings(_ranking(part), _ranking(every), cfg.search.top_k)
            sub_best = _ranking(part)[0]
            row.update(subset_best=sub_best, subset_best_auroc=every[sub_best]["auroc"],
                       subset_gap=every[best_key]["auroc"] - every[sub_best]["auroc"], kendall_tau=agreement.kendall_tau,
                       top_k=agreement.top_k, top_k_overlap=agreement.top_k_overlap, subset_scores=part)
        per_seed.append(row)

    print(format_report(cfg, space, index, budget, extraction, trial_epochs, cached_s, cached_h, base_s, base_h,
                        per_seed, fraction, subset))
    results = {"base": weights, "space": space_path, "budget": budget, "fraction": fraction,
               "subset": None if subset is None else {"images": subset.images, "patients": subset.patients},
               "seeds": per_seed}
    if keep is not None:  # every head's score, per seed: the data behind the tables
        fs.write_text_atomic(os.path.join(root, "bench_search.json"), json.dumps(results, indent=2))
        log(f"bench search: wrote {os.path.join(root, 'bench_search.json')}")
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return {"extraction": extraction, "ratio": base_s / cached_s, "base": weights, "seeds": per_seed,
            "gaps": [r["gap"] for r in per_seed], "explored": [r["explored"] for r in per_seed]}


def format_report(cfg: Config, space, index, budget, extraction, trial_epochs, cached_s, cached_h, base_s, base_h,
                  per_seed, fraction, subset) -> str:
    lines = [
        f"bench search: {cfg.model.backbone} {cfg.data.image_size} px, base {cfg.model.weights}, "
        f"{index['images']['train']} train / {index['images']['val']} val images, batch {cfg.train.batch_size}, "
        f"{os.cpu_count()} CPU cores, feature shape {tuple(index['feature_shape'])}, {space.size} heads",
        f"  feature extraction (train + val, once):       {extraction:8.1f} s",
        f"  trial on cached features ({trial_epochs} epochs):         {cached_s:8.2f} s  "
        f"(val AUROC {cached_h[-1]:.4f})",
        f"  same trial, frozen base run every epoch:      {base_s:8.2f} s  (val AUROC {base_h[-1]:.4f})",
        f"  ratio base-in-loop / cache: {base_s / cached_s:.1f}x (goal >= 20x)",
        f"  search with a budget of {budget:g} full trainings (N/4) against all {space.size} heads x "
        f"{cfg.phases[0].epochs} epochs, per seed:",
        "| seed | explored | second looks (promoted) | spent | search s | exhaustive s | selected (val AUROC, rank) "
        "| exhaustive best | gap |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in per_seed:
        looks = r["second_looks"]
        lines.append(f"| {r['seed']} | {r['explored']} of {space.size} | {sum(looks.values())} ({looks['promoted']}) | "
                     f"{r['spent']:.2f} | {r['search_s']:.1f} | "
                     f"{r['exhaustive_s']:.1f} | {r['chosen']} ({r['chosen_auroc']:.4f}, {r['rank']}) | "
                     f"{r['best']} ({r['best_auroc']:.4f}) | {r['gap']:.4f} |")
    met = sum(r["gap"] <= GOAL_GAP for r in per_seed)
    lines.append(f"goal: the N/4 search's head within {GOAL_GAP} of the exhaustive best: {met} of {len(per_seed)} "
                 f"seed(s), {'met' if met == len(per_seed) else 'not met'}")
    lines += [f"  successive-halving schedules replayed on each seed's exhaustive curves ({REPLAY_DRAWS} random draws "
              f"of the plan's heads, halved synchronously; this run's search used min_epochs "
              f"{cfg.search.min_epochs}, reduction_factor {cfg.search.reduction_factor}):",
              "| min_epochs | reduction_factor | heads | rungs | " + " | ".join(
                  f"seed {r['seed']}: within {GOAL_GAP}, mean gap" for r in per_seed) + " |",
              "| ---: | ---: | ---: | --- |" + " ---: |" * len(per_seed)]
    for i, schedule in enumerate(per_seed[0]["replay"] if per_seed else []):
        cells = [f"{r['replay'][i]['within_goal']:.0%}, {r['replay'][i]['mean_gap']:.4f}" for r in per_seed]
        lines.append(f"| {schedule['min_epochs']} | {schedule['reduction_factor']} | {schedule['trials']} | "
                     f"{', '.join(map(str, schedule['rungs']))} | " + " | ".join(cells) + " |")
    if subset is not None:
        lines += [f"  subset transfer: all heads on {fraction:g} of the train split ({subset.images} images of "
                  f"{subset.patients} patients, nested by patient) against the full split:",
                  "| seed | Kendall's tau | top-k overlap | subset's best head | its full-data val AUROC | "
                  "behind the full-data best |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in per_seed:
            tau = "n/a" if r["kendall_tau"] is None else f"{r['kendall_tau']:.3f}"
            lines.append(f"| {r['seed']} | {tau} | {r['top_k_overlap']:.2f} (k={r['top_k']}) | {r['subset_best']} | "
                         f"{r['subset_best_auroc']:.4f} | {r['subset_gap']:.4f} |")
    return "\n".join(lines)
