"""`medtl search`: budgeted successive halving over a head search space, on cached features.

    medtl search --config jobs/chestxray14_b4.yaml --space jobs/search/heads.yaml --budget 8 --workdir runs/search

The budget is in full trainings: one full training is phase 1's epochs (the head schedule).
Trials run under Optuna's asynchronous successive halving pruner: a trial trains epoch by
epoch on the feature cache, reports val macro AUROC, and continues past a rung
(min_epochs x reduction_factor^k epochs) only while it is in the best 1/reduction_factor of
the trials that reached that rung. The study lives in --storage (default a SQLite file in the
workdir; a database URL lets several workers share it). Re-running the same command resumes:
finished trials are kept, an interrupted one is run again.

With search.fractions (`--fractions 0.1,0.3,1.0`) the same budgeted search runs on nested,
patient-level subsets of the train split (medtl.data.subsets; rows of the cached features, val fixed),
one study per fraction, and medtl.search.transfer compares each fraction's ranking with the largest's.

Workdir: study.db, best.yaml (a job config for `medtl train`), leaderboard.csv, search.html,
search_summary.json, and with fractions learning_curve.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
import time

from medtl import dist
from medtl.config import Config, HeadConfig
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError, MedtlError, RunFailure
from medtl.search.space import SearchSpace, check_heads_fit, defaults_from, load_space
from medtl.utils import faults
from medtl.utils.log import log

STORAGE_ENV = "MEDTL_SEARCH_STORAGE"
DEFAULT_STUDY = "medtl-head-search"
# Without a heartbeat for this long, another worker's RUNNING trial is taken as dead and retried.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120
# First-rung scores needed before a failed start can be told from the spread (search.second_look_below).
FAILED_START_MIN_SCORES = 8
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation is 1.4826 x its median absolute deviation


@dataclasses.dataclass(frozen=True)
class Plan:
    full_epochs: int           # one full training: phase 1's epochs
    rungs: tuple[int, ...]     # epochs at which successive halving compares trials
    budget_epochs: float       # the budget in epochs of head training
    trials: int                # trials to start: the most whose successive halving fits the budget


def halving_cost(n: int, rungs: tuple[int, ...], eta: int) -> int:
    """Epochs synchronous successive halving spends on n heads (n, n/eta, ... heads per rung)."""
    cost, alive, previous = 0, n, 0
    for rung in rungs:
        cost += alive * (rung - previous)
        previous, alive = rung, max(1, alive // eta)
    return cost


def plan_search(cfg: Config, space: SearchSpace, budget: float) -> Plan:
    """The rungs and trial count for a budget, or a ConfigError when it cannot buy one rung."""
    full = cfg.phases[0].epochs
    r, eta = cfg.search.min_epochs, cfg.search.reduction_factor
    if r > full:
        raise ConfigError(f"search.min_epochs ({r}) is more than phase 1's epochs ({full}, one full training); "
                          f"lower search.min_epochs or raise phases.0.epochs")
    rungs, rung = [], r
    while rung < full:
        rungs.append(rung)
        rung *= eta
    rungs.append(full)
    budget_epochs = budget * full
    if not budget > 0 or budget_epochs < r:
        raise ConfigError(f"--budget {budget:g} full trainings is {budget_epochs:g} epochs, less than one rung "
                          f"(search.min_epochs = {r} epoch(s) of one head); raise --budget to at least {r / full:g}")
    n = 1
    while n < space.size and halving_cost(n + 1, tuple(rungs), eta) <= budget_epochs:
        n += 1
    if halving_cost(n, tuple(rungs), eta) > budget_epochs:
        n = min(space.size, max(1, int(budget_epochs // r)))  # not even one full training: first rung only
    return Plan(full, tuple(rungs), budget_epochs, n)


def check_space_fits_cache(cfg: Config, space: SearchSpace) -> None:
    if not cfg.search.pooled_cache:
        return
    if space.head_lists:
        maps = [name for name, layers in space.head_lists.items() if HeadConfig(layers=layers).pooled_start() is None]
        if maps:
            raise ConfigError(f"the search space's head(s) {', '.join(maps)} do not start with global_pool avg or max, "
                              "but search.pooled_cache is true: a pooled cache holds avg- and max-pooled vectors only, "
                              "and conv, local pooling, flatten and gem need the spatial feature maps; "
                              "--set search.pooled_cache=false or drop those heads")
        return
    if space.uses_conv:
        raise ConfigError("the search space has conv_filters "
                          f"{[f for f in space.choices['conv_filters'] if f]} but search.pooled_cache is true: "
                          "a 1x1 conv needs the spatial feature maps; use conv_filters: [0] or "
                          "--set search.pooled_cache=false")
    if "gem" in space.choices["pooling"]:
        raise ConfigError("the search space has pooling 'gem' but search.pooled_cache is true: a pooled cache "
                          "holds avg and max pooled vectors only; drop gem or --set search.pooled_cache=false")


def open_storage(url: str):
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat

    shown = url.split("@")[-1] if "@" in url else url  # never print a password
    example = "sqlite:///runs/search/study.db or postgresql://USER:PASSWORD@HOST/DB"
    if not url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        raise MedtlError(f"search storage {shown!r} is not a database URL; give one such as {example}")
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    except (ImportError, ModuleNotFoundError) as exc:  # the URL's driver is not installed: a usage error
        raise MedtlError(f"search storage {shown!r} needs a database driver that is not installed "
                         f"({str(exc).splitlines()[0][:160]}); install it or use {example}") from None
    except Exception as exc:  # an unreachable server, a malformed URL the driver rejects
        # Exit 1, not 2: a database that is not up yet (its pod still starting) is worth a retry.
        raise RunFailure(f"search storage {shown!r} cannot be opened ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}); give a database URL such as {example}") from None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study) -> int:
    """Trials left RUNNING by a dead process on this host: marked failed and queued again."""
    from optuna.trial import TrialState

    host, me = socket.gethostname(), os.getpid()
    retried = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, w_pid = worker.rpartition(":")
        if w_host != host or not w_pid.isdigit() or (int(w_pid) != me and _alive(int(w_pid))):
            continue  # another live worker's trial (or another host's: the heartbeat covers those)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        retried += 1
    return retried


def failed_starts(scores: dict[int, float], below: float) -> list[int]:
    """Trial numbers whose first-rung score lies more than `below` robust standard deviations
    (MAD_TO_SD x the median absolute deviation) under the median of `scores` (trial number -> score).
    Empty while fewer than FAILED_START_MIN_SCORES scores are known, or when they do not spread."""
    import numpy as np

    finite = {n: v for n, v in scores.items() if np.isfinite(v)}
    if below <= 0 or len(finite) < FAILED_START_MIN_SCORES:
        return []
    values = np.array(list(finite.values()))
    median = float(np.median(values))
    spread = MAD_TO_SD * float(np.median(np.abs(values - median)))
    if spread <= 0:
        return []
    return sorted(n for n, v in finite.items() if (median - v) / spread > below)


def first_rung_scores(trials, first_rung: int, exclude: int | None = None) -> dict[int, float]:
    """Trial number -> val AUROC at the first rung, for every trial that reached it but `exclude` and failed
    ones (a killed trial's retry stands for it); running ones count, as Optuna's pruner counts them."""
    from optuna.trial import TrialState

    return {t.number: float(t.intermediate_values[first_rung]) for t in trials
            if first_rung in t.intermediate_values and t.number != exclude and t.state != TrialState.FAIL
            and math.isfinite(t.intermediate_values[first_rung])}


def promotable(value: float, others: list[float], eta: int) -> bool:
    """Optuna's successive-halving rule: `value` is among the best 1/eta of itself and `others`."""
    ranked = sorted(others + [value], reverse=True)
    return value >= ranked[max(len(ranked) // eta - 1, 0)]


def _spent(trials) -> int:
    return sum(int(t.user_attrs.get("epochs", 0)) for t in trials)


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, for a study that also runs enqueued trials (a killed trial's retry): those
        have no grid point, and Optuna's after_trial looks one up when a single grid point is left (a
        KeyError that ends the search)."""

        def after_trial(self, study, trial, state, values) -> None:
            if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
                super().after_trial(study, trial, state, values)

    return GridSampler


def build_sampler(cfg: Config, space: SearchSpace):
    import optuna

    seed = cfg.seed
    if cfg.search.sampler == "grid":
        return _grid_sampler_class()({k: list(v) for k, v in space.searched.items()}, seed=seed)
    if cfg.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def run_search(cfg: Config, space_path: str, budget: float, workdir: str, storage: str | None = None,
               study_name: str | None = None) -> dict | None:
    """Run (or resume, or join) a head search; returns the summary (None on non-primary ranks)."""
    space = load_space(space_path, defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name))
    check_heads_fit(space, cfg.model.backbone, cfg.data.image_size, space_path)
    check_space_fits_cache(cfg, space)
    plan = plan_search(cfg, space, budget)
    if not space.searched:
        raise ConfigError(f"the search space {space_path} has one head only; list two or more choices for a key")
    ctx = dist.init(cfg.train.stall_shutdown_seconds)
    storage_url = storage or os.environ.get(STORAGE_ENV) or ""
    if ctx.primary:
        os.makedirs(workdir, exist_ok=True)
    storage_url = storage_url or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"
    if ctx.primary:
        open_storage(storage_url)  # a bad URL fails now, before any feature is extracted

    from medtl.data.manifest import check_train_split, read_manifest
    from medtl.search import cache

    manifest = read_manifest(cfg.data.records)  # refuses unlabeled records
    check_train_split(cfg.data.records, manifest)
    folder, index, extracted = cache.ensure_cache(cfg, manifest, ctx)
    if not ctx.primary:
        return None  # ranks split the extraction; trials run on rank 0 (or on several workers, see README)
    return _search(cfg, space, plan, workdir, storage_url, study_name or DEFAULT_STUDY, manifest, folder, index,
                   extracted)


def _search(cfg, space, plan, workdir, storage_url, study_name, manifest, folder, index, extracted) -> dict:
    import optuna

    from medtl.data.subsets import select_subsets
    from medtl.search.cache import load_split
    from medtl.search.report import write_outputs
    from medtl.search.transfer import FractionRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train, val = load_split(folder, index, "train"), load_split(folder, index, "val")
    defined = [i for i in range(val.labels.shape[1])
               if 0 < val.labels[val.mask[:, i] > 0, i].sum() < (val.mask[:, i] > 0).sum()]
    if not defined:
        raise MedtlError("no label has both positives and negatives in the val split, so val AUROC is undefined; "
                         "ingest more studies")
    fractions = cfg.search.fractions or (1.0,)
    # Before any trial: a fraction without positives of a label stops here (the cache is kept for the re-run).
    subsets = select_subsets(train.patients, train.labels, train.mask, fractions, cfg.seed, manifest.labels)
    transfer = len(subsets) > 1 or fractions != (1.0,)
    if transfer:
        log("search: subset transfer over " + ", ".join(
            f"{f:g} ({s.images} images of {s.patients} patients)" for f, s in subsets.items())
            + f" of the train split (nested, by patient; val fixed at {len(val.labels)} images)")
    runs = []
    for fraction, subset in subsets.items():
        part = train if subset.images == len(train.labels) else train.select(subset.rows)
        name = study_name if fraction == 1.0 else f"{study_name}-f{fraction:g}"
        tag = f" at fraction {fraction:g}" if transfer else ""
        study = _run_study(cfg, space, plan, storage_url, name, manifest, part, val, index, subset, tag)
        runs.append(FractionRun(fraction, subset, study))
    curve = learning_curve(cfg, space, plan, runs, manifest, train, val, index) if len(runs) > 1 else None
    return write_outputs(cfg, space, plan, runs, workdir, index, extracted, folder, curve)


def _run_study(cfg, space, plan, storage_url, study_name, manifest, train, val, index, subset, tag: str):
    """One budgeted successive-halving study on `train` (the whole split or a subset); returns it."""
    import optuna
    from optuna.trial import TrialState

    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.search.min_epochs,
                                                     reduction_factor=cfg.search.reduction_factor)
    study = optuna.create_study(storage=open_storage(storage_url), study_name=study_name, direction="maximize",
                                sampler=build_sampler(cfg, space), pruner=pruner, load_if_exists=True)
    second_look_below = _check_same_search(study, cfg, space, plan, subset)
    retried = recover_interrupted(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if done:
        log(f"search: resuming study '{study_name}': {len(done)} finished trial(s) kept"
            + (f", {retried} interrupted trial(s) queued again" if retried else ""))
    log(f"search{tag}: {space.size} heads in the space, budget {plan.budget_epochs / plan.full_epochs:g} full "
        f"trainings ({plan.budget_epochs:g} epochs of {plan.full_epochs}), rungs at {', '.join(map(str, plan.rungs))} "
        f"epochs (keep 1/{cfg.search.reduction_factor}), up to {plan.trials} trials, sampler {cfg.search.sampler}")
    objective = build_objective(cfg, space, plan, study, manifest, train, val, index, tag, second_look_below)
    ran = 0
    while True:
        if _spent(study.get_trials(deepcopy=False)) + cfg.search.min_epochs > plan.budget_epochs:
            break
        trials = study.get_trials(deepcopy=False)
        begun = [t for t in trials if t.state not in (TrialState.FAIL, TrialState.WAITING)]
        waiting = [t for t in trials if t.state == TrialState.WAITING]  # interrupted trials queued again
        if len(begun) >= plan.trials and not waiting:
            break
        study.optimize(objective, n_trials=1)
        ran += 1
    log(f"search{tag}: {ran} trial(s) run by this worker; spent "
        f"{_spent(study.get_trials(deepcopy=False)) / plan.full_epochs:.2f} of {plan.budget_epochs / plan.full_epochs:g} full trainings")
    return study


def learning_curve(cfg, space, plan, runs, manifest, train, val, index):
    """The largest fraction's best head, trained for the full schedule at every fraction (a trial's full-
    schedule score where the fraction's search has one: heads are seeded by themselves, so it is the same)."""
    from medtl.evaluate.curve import CurvePoint, LearningCurve
    from medtl.search.report import best_trial
    from medtl.search.trial import train_on_cache
    from medtl.search.transfer import full_schedule_score

    best, _ = best_trial(runs[-1].study, plan)
    if best is None:
        return None
    head = space.head(best.params)
    points = []
    for run in runs:
        score = full_schedule_score(run.study, head.key(), plan.full_epochs)
        if score is None:
            part = train if run.subset.images == len(train.labels) else train.select(run.subset.rows)
            score = train_on_cache(cfg, head, manifest, part, val, index["feature_shape"], bool(index["meta"]["pooled"]),
                                   plan.full_epochs, lambda epoch, auroc: True)[-1]
        points.append(CurvePoint(run.fraction, run.subset.images, run.subset.patients, float(score)))
        log(f"search: learning curve of {head.key()}: fraction {run.fraction:g} ({run.subset.images} train images) "
            f"val macro AUROC {score:.4f}")
    curve = LearningCurve(head.key(), plan.full_epochs, tuple(points))
    log(f"search: learning curve {curve.verdict()}")
    return curve


def build_objective(cfg: Config, space: SearchSpace, plan: Plan, study, manifest: Manifest, train, val, index: dict,
                    tag: str = "", second_look_below: float = 0.0):
    """The Optuna objective: train the trial's head on the cache epoch by epoch, report val AUROC,
    stop when pruned, at the full schedule, or when the study's budget is spent.

    A second look: the first rung's score also carries the luck of a head's first epoch. Heads trained
    alike score close together there (a median absolute deviation of ~0.005 AUROC in docs/benchmarks.md);
    a head whose score the pruner rejects and which lies more than `second_look_below` robust standard
    deviations under the median is a failed start. It trains one more epoch and is judged again, by the
    same rule, against the first rung's scores (by the pruner instead, if that epoch is a rung itself):
    a slow starter goes on, a head that cannot learn is pruned one epoch later."""
    import optuna

    from medtl.search.trial import train_on_cache

    pooled = bool(index["meta"]["pooled"])
    worker = _worker_id()
    first = plan.rungs[0]
    eta = cfg.search.reduction_factor

    def spent_now() -> int:
        return _spent(study.get_trials(deepcopy=False))

    def failed_start(trial, auroc: float) -> dict[int, float] | None:
        """The first rung's scores if this trial's is a failed start among them, else None."""
        if second_look_below <= 0 or first + 1 >= plan.full_epochs:  # one more epoch would be the whole schedule
            return None
        scores = first_rung_scores(study.get_trials(deepcopy=False), first, exclude=trial.number)
        scores[trial.number] = auroc
        return scores if trial.number in failed_starts(scores, second_look_below) else None

    def objective(trial):
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in space.searched.items()}
        head = space.head(params)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("head", head.key())
        trial.set_user_attr("epochs", 0)
        stop = {"reason": "", "second_look_at": 0}  # the epoch of a failed start's second look, once it is due
        start = time.monotonic()

        def second_look(epoch: int, auroc: float) -> bool:
            """The epoch after a failed start: whether the trial goes on."""
            if epoch in plan.rungs:  # the pruner judges it at this rung, against the trials that reached it
                going_on = not trial.should_prune()
            else:
                others = first_rung_scores(study.get_trials(deepcopy=False), first, exclude=trial.number)
                going_on = promotable(auroc, list(others.values()), eta)
            trial.set_user_attr("second_look", "promoted" if going_on else "pruned")
            log(f"trial {trial.number}{tag}: {head.key()}: second look after {epoch} epoch(s): val macro AUROC "
                f"{auroc:.4f}, " + ("promoted: a slow starter" if going_on else "pruned"))
            return going_on

        def on_epoch(epoch: int, auroc: float) -> bool:
            auroc = faults.trial_score(trial.number, epoch, auroc)
            trial.report(auroc, epoch)
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("seconds", time.monotonic() - start)
            faults.in_trial(trial.number, epoch)
            if epoch in plan.rungs:
                log(f"trial {trial.number}{tag}: {head.key()}: rung {plan.rungs.index(epoch) + 1}/{len(plan.rungs)} "
                    f"({epoch} epoch(s)) val macro AUROC {auroc:.4f}; spent "
                    f"{spent_now() / plan.full_epochs:.2f}/{plan.budget_epochs / plan.full_epochs:g} full trainings")
            if epoch == plan.full_epochs:
                return False
            if epoch == stop["second_look_at"]:
                if not second_look(epoch, auroc):
                    stop["reason"] = "pruned"
                    return False
            elif trial.should_prune():
                scores = failed_start(trial, auroc) if epoch == first else None
                if scores is None:
                    stop["reason"] = "pruned"
                    return False
                stop["second_look_at"] = epoch + 1
                log(f"trial {trial.number}{tag}: {head.key()}: first-rung val macro AUROC {auroc:.4f} lies over "
                    f"{second_look_below:g} robust standard deviations under the median of {len(scores)} trials "
                    f"({statistics.median(scores.values()):.4f}): a failed start; one more epoch before it is judged")
            if spent_now() >= plan.budget_epochs:
                stop["reason"] = "budget"
                return False
            return True

        trained = head
        if faults.failed_start(trial.number):
            trained = dataclasses.replace(head, learning_rate=-head.learning_rate)
        history = train_on_cache(cfg, trained, manifest, train, val, index["feature_shape"], pooled,
                                 plan.full_epochs, on_epoch)
        trial.set_user_attr("seconds", time.monotonic() - start)
        if stop["reason"]:
            trial.set_user_attr("stopped", stop["reason"])
            raise optuna.TrialPruned()
        return history[-1]

    return objective


def _check_same_search(study, cfg: Config, space: SearchSpace, plan: Plan, subset) -> float:
    """A study continues only the search it was started with (same space, rungs, budget, cache, subset,
    second looks); returns the search.second_look_below it runs with."""
    search = {"space": space.fingerprint(), "rungs": plan.rungs,
              "budget_epochs": plan.budget_epochs, "trials": plan.trials,
              "reduction_factor": cfg.search.reduction_factor, "sampler": cfg.search.sampler,
              "seed": cfg.seed, "backbone": cfg.model.backbone, "image_size": cfg.data.image_size}
    if subset.fraction != 1.0:  # the whole split's study keeps the fingerprint searches had before subsets
        search.update(fraction=subset.fraction, subset=subset.digest)
    legacy = json.dumps(search, sort_keys=True)  # a study started before medtl took second looks
    fingerprint = json.dumps(search | {"second_look_below": cfg.search.second_look_below}, sort_keys=True)
    found = study.user_attrs.get("search")
    if found is None:
        study.set_user_attr("search", fingerprint)
    elif found == legacy:
        log(f"search: the study '{study.study_name}' was started before medtl took second looks at failed "
            "starts; it continues without them")
        return 0.0
    elif "restart_below" in json.loads(found):
        raise MedtlError(f"the study '{study.study_name}' in this storage restarted failed starts with a new "
                         "initialisation (medtl of 2026-12-05, search.restart_below), which this medtl replaced by "
                         "a second look (search.second_look_below); use a new --workdir or --study-name")
    elif found != fingerprint:
        raise MedtlError(f"the study '{study.study_name}' in this storage was started with another search "
                         "(space, budget, rungs, sampler, seed, backbone or search.second_look_below differ); use a "
                         "new --workdir or --study-name, or the original settings to resume it")
    return cfg.search.second_look_below
