"""Ranks that die, stall or meet NaNs on 2 CPU ranks, and resuming afterwards: under horovodrun --gloo and,
for death, resume and stalls, under mpirun as the training MPIJob runs it (conftest.launcher_argv)."""
import json
import os
import re
import time

import numpy as np
import pytest

from medtl.data.manifest import read_manifest

from conftest import assert_user_error
from reliability.helpers import LAUNCHERS, history, launcher_argv, rank_lines, report, train

pytestmark = pytest.mark.slow


def _steps(records, ranks, batch=8):
    manifest = read_manifest(records)
    return manifest.records("train") // (batch * ranks)


def _rank_errors(output: str) -> dict[int, str]:
    """{rank: its `medtl: error:` line} from the launcher's rank-prefixed output."""
    return {rank: lines[-1].removeprefix("medtl: error: ")
            for rank, lines in rank_lines(output, "medtl: error: ").items()}


def _no_rank_traceback(output: str) -> None:
    assert not rank_lines(output, "Traceback"), output[-3000:]


def _under(launcher: str) -> str:
    """The suffix of a summary row's check name (the horovodrun rows keep their names)."""
    return "" if launcher == "horovodrun" else f" under {launcher}"


@pytest.fixture(scope="module", params=LAUNCHERS)
def killed_run(records, tmp_path_factory, request):
    """2 ranks: a NaN batch on rank 1 in epoch 1, then rank 1 SIGKILLed mid-epoch 3 (the first of phase 'top')."""
    launcher = request.param
    run = tmp_path_factory.mktemp(f"killed-{launcher}") / "run"
    steps = _steps(records, 2)
    kill_step = 2 * steps + steps // 2
    r = train(records, run, launcher=launcher_argv(launcher),
              extra_env={"MEDTL_FAULTS": f"nan_batch:rank=1,step=2;kill:rank=1,step={kill_step}"})
    ended = time.time()
    # Timed from the death (the fault prints the time), not from the start: a loaded machine
    # slows the training before it, which is not what the check is about.
    died = re.search(r"SIGKILLs itself before global step \d+ at unix time ([\d.]+)", r.stdout + r.stderr)
    return run, r, ended - float(died.group(1)) if died else None, kill_step, launcher


def test_nan_batch_on_one_rank_keeps_ranks_in_sync(killed_run):
    run, r, _, _, launcher = killed_run
    out = r.stdout + r.stderr
    # Phase 'head' ended before the kill: every rank held identical weights (fingerprints allgathered).
    assert re.search(r"phase 'head': weights identical on 2 rank\(s\)", out), out[-3000:]
    rows = history(run)
    assert rows[0]["skipped_steps_total"] == 1, rows[0]  # every rank skipped that one update
    assert all(np.isfinite(row["loss"]) for row in rows)
    report(f"9a. NaN batch on one rank{_under(launcher)}", "NaN input batch on rank 1 at step 2 of a 2-rank run",
           "both ranks skipped the same one update; weights identical on both ranks after the phase",
           nan_batches_injected=1)


# How each launcher names the rank that died (horovodrun: the first process that failed).
KILLED = {"horovodrun": (r"Process 1 exit with status code 137", r"Process name: 1"),
          "mpirun": (r"mpirun noticed that process rank 1 with PID \d+ on node \S+ exited on signal 9 \(Killed\)",)}


def test_killed_rank_names_it_and_resume_runs_every_epoch_once(killed_run, records):
    run, r, seconds, kill_step, launcher = killed_run
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert seconds is not None, f"rank 1 did not report its scheduled death: {out[-3000:]}"
    assert seconds < 60, f"launcher took {seconds:.0f} s to exit after a rank died"
    for pattern in KILLED[launcher]:
        assert re.search(pattern, out), out[-3000:]
    state = json.load(open(run / "checkpoints" / "state.json"))
    assert state["epochs_done"] == 2 and state["ranks"] == 2
    assert os.path.exists(run / "checkpoints" / state["checkpoint"])

    # horovodrun: one rank this time. mpirun: the same 2-rank command, as a restarted MPIJob launcher runs it.
    argv, ranks = {"horovodrun": (None, 1), "mpirun": (launcher_argv("mpirun"), 2)}[launcher]
    r = train(records, run, launcher=argv)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "resuming" in out and "after epoch 2" in out
    rows = history(run)
    assert [(row["epoch"], row["phase"]) for row in rows] == [(0, "head"), (1, "head"), (2, "top"), (3, "top")]
    assert [row["ranks"] for row in rows] == [2, 2, ranks, ranks]

    if launcher == "horovodrun":  # on 1 rank, launcher-independent: once is enough
        r = train(records, run, "train.jit_compile=true")  # an execution setting may change
        assert r.returncode == 0 and "is complete" in r.stderr and "nothing to do" in r.stderr
        assert len(history(run)) == 4
        assert_user_error(train(records, run, "model.head.dropout=0.5"), "holds a run with a different config",
                          "model.head.dropout")
    report(f"1. Rank death{_under(launcher)}",
           f"SIGKILL of rank 1 of 2 at global step {kill_step} (mid-epoch 3), then a re-run on {ranks} rank(s)",
           f"{launcher} exited non-zero {seconds:.0f} s after the rank died, naming rank 1 (< 60 s); the re-run "
           "resumed after epoch 2 and history.jsonl lists epochs 0-3 once each", ranks_killed=1)


# (launcher, fault on rank 1, where rank 0 waits, where rank 1 was last seen, summary row, what was done).
# The validation case also stands for the other allgathers (the same dist.allgather wait; a stall before the
# weights-fingerprint allgather ended the same way, `stall_collective:rank=1,name=weights_fingerprint`, with
# --set phases.0.epochs=1); one 2-rank run each costs about a minute of `make test`.
STALLS = [
    # One stall per launcher and per kind of wait: each launcher's heartbeat store (horovodrun's
    # rendezvous, the one rank 0 serves under mpirun) and both kinds of timed wait are covered.
    pytest.param("mpirun", "stall:rank=1,step=3,seconds=900", "training step 3", "training step 2",
                 "2. Stall under mpirun", "rank 1 of 2 blocked 900 s before the allreduce of step 3",
                 id="step-mpirun"),
    pytest.param("horovodrun", "stall_validation:rank=1,epoch=0,seconds=900", "the allgather of val_probs",
                 "validation after epoch 1", "2b. Stall in validation",
                 "rank 1 of 2 blocked 900 s in the validation after epoch 1, before its predictions",
                 id="validation-horovodrun"),
]


@pytest.mark.parametrize("launcher, fault, waits_in, last_seen, check, done", STALLS)
def test_stalled_rank_ends_the_job_naming_it(records, tmp_path, launcher, fault, waits_in, last_seen, check, done):
    shutdown = 20
    start = time.monotonic()
    r = train(records, tmp_path / "run", f"train.stall_shutdown_seconds={shutdown}",
              launcher=launcher_argv(launcher), extra_env={"MEDTL_FAULTS": fault})
    seconds = time.monotonic() - start
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert seconds < 300, f"the job took {seconds:.0f} s with a {shutdown} s stall shutdown (the stall is 900 s)"
    errors = _rank_errors(out)
    assert 0 in errors, out[-3000:]
    assert f"rank(s) 1 did not reach {waits_in} (last seen at rank 1: {last_seen})" in errors[0], errors[0]
    assert f"train.stall_shutdown_seconds={shutdown}" in errors[0]
    waited = float(re.search(r"waited (\d+) s", errors[0]).group(1))
    assert shutdown <= waited <= shutdown + 10, errors[0]  # ended within the shutdown time (+ one poll)
    _no_rank_traceback(out)
    report(check, f"{done}; stall shutdown {shutdown} s ({launcher})",
           f"rank 0 ended the job after waiting {waited:.0f} s in {waits_in}, naming rank 1 and where it was last "
           f"seen ({last_seen}); launcher exit non-zero after {seconds:.0f} s in all", ranks_stalled=1)


def test_persistent_nan_stops_both_ranks_and_keeps_the_best(records, tmp_path):
    run = tmp_path / "run"
    steps = _steps(records, 2)
    r = train(records, run, "train.nonfinite_patience=3", launcher=launcher_argv("horovodrun"),
              extra_env={"MEDTL_FAULTS": f"nan_from:step={steps}"})  # every batch from epoch 2 on
    out = r.stdout + r.stderr
    assert r.returncode != 0
    errors = _rank_errors(out)
    # Both ranks stop in the same step (the NaN streak comes from gradients averaged over ranks). Rank 0
    # reports it and exits first; horovodrun then ends rank 1 (dist.primary_reports_agreed_stop). Before
    # that, rank 1 sometimes exited first and horovodrun ended rank 0 before it had printed.
    assert 0 in errors and set(errors) <= {0, 1}, out[-3000:]
    assert "Process 0 exit with status code" in out and "failure of Process 0" in out, out[-3000:]
    for line in errors.values():
        for fragment in ("not finite", "epoch 2", "training stopped on all ranks", "epoch-0000.weights.h5",
                         "phases.0.learning_rate"):
            assert fragment in line, line
    _no_rank_traceback(out)
    state = json.load(open(run / "checkpoints" / "state.json"))
    assert state["epochs_done"] == 1 and len(history(run)) == 1
    # The best weights are those of epoch 1, the only complete epoch: not overwritten, finite.
    import h5py

    def arrays(path):
        found = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
        return found

    best = dict(arrays(run / "checkpoints" / "best.weights.h5"))
    epoch = dict(arrays(run / "checkpoints" / "epoch-0000.weights.h5"))
    layer_weights = [k for k in best if not k.startswith("optimizer")]
    assert layer_weights and all(np.isfinite(best[k]).all() for k in layer_weights)
    assert all(np.array_equal(best[k], epoch[k]) for k in layer_weights)
    report("9b. Persistent NaN", "NaN inputs on both ranks from the first step of epoch 2 (patience 3)",
           "the job stopped in epoch 2 on all ranks; rank 0 printed the one error line and horovodrun named it as the "
           "failed process; best.weights.h5 equals epoch 1's, all finite",
           nan_batches_injected=steps)
