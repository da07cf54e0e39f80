"""`medtl pretrain` with pretrain.method simclr: the NT-Xent loss against hand-computed values, the two-view
stream on records without labels, the CLI on 1 rank (then `medtl train` from its base) and under horovodrun
-np 2 (negatives gathered from both ranks, the gathered gradient, identical weights), and the refusals."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, assert_user_error, cli_env, launcher_argv, rank_lines, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
SIMCLR_SET = ("--set", "pretrain.method=simclr",
              "--set", "phases=[{name: all, epochs: 1, learning_rate: 0.001, trainable: all, train_batch_norm: true}]")
HEAD_ONLY_SET = ("--set", "phases=[{name: head, epochs: 1, learning_rate: 0.001, trainable: none}]")


def _pretrain(records, run, *extra, launcher=None, env=None):
    return run_cli("pretrain", "--config", TINY, "--workdir", run, "--set", f"data.records={records}",
                   *SIMCLR_SET, *extra, launcher=launcher, env=env)


def _loss(positive, negatives, temperature):
    """-log of the positive's softmax share among the positive and the negatives (cosines / temperature)."""
    top = math.exp(positive / temperature)
    return -math.log(top / (top + sum(math.exp(n / temperature) for n in negatives)))


def test_nt_xent_against_hand_computed_values():
    from medtl.models.contrastive import nt_xent

    # Image 0: view a (1, 0), view b (3, 4) -> normalised (0.6, 0.8). Image 1: a (0, 1), b (-0.6, 0.8).
    # Cosines: a0.b0 = 0.6, a0.a1 = 0, a0.b1 = -0.6, b0.a1 = 0.8, b0.b1 = -0.36 + 0.64 = 0.28, a1.b1 = 0.8.
    # Each anchor: its positive is the other view of its image, its negatives the other image's 2 views.
    t = 0.5
    views_a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    views_b = np.array([[3.0, 4.0], [-0.6, 0.8]], np.float32)
    one_rank = (_loss(0.6, [0.0, -0.6], t)      # a0: positive b0; negatives a1, b1
                + _loss(0.6, [0.8, 0.28], t)    # b0: positive a0; negatives a1, b1
                + _loss(0.8, [0.0, 0.8], t)     # a1: positive b1; negatives a0, b0
                + _loss(0.8, [-0.6, 0.28], t)) / 4  # b1: positive a1; negatives a0, b0
    loss, hits = nt_xent(views_a, views_b, 0, 2, t)
    assert float(loss) == pytest.approx(one_rank, rel=1e-5)
    assert hits.shape == (4,) and float(hits[0]) == 1.0 and float(hits[1]) == 0.0  # b0 is closer to a1 (0.8)

    # A second rank's image 2, gathered: a (-1, 0), b (-0.8, -0.6). Cosines with it: a0.a2 = -1, a0.b2 = -0.8,
    # b0.a2 = -0.6, b0.b2 = -0.48 - 0.48 = -0.96, a1.a2 = 0, a1.b2 = -0.6, b1.a2 = 0.6, b1.b2 = 0.48 - 0.48 = 0,
    # a2.b2 = 0.8. Rank 0's anchors (images 0, 1) each gain those 2 negatives.
    gathered_a = np.concatenate([views_a, [[-1.0, 0.0]]]).astype(np.float32)
    gathered_b = np.concatenate([views_b, [[-0.8, -0.6]]]).astype(np.float32)
    rank0 = (_loss(0.6, [0.0, -0.6, -1.0, -0.8], t) + _loss(0.6, [0.8, 0.28, -0.6, -0.96], t)
             + _loss(0.8, [0.0, 0.8, 0.0, -0.6], t) + _loss(0.8, [-0.6, 0.28, 0.6, 0.0], t)) / 4
    loss0, _ = nt_xent(gathered_a, gathered_b, 0, 2, t)
    assert float(loss0) == pytest.approx(rank0, rel=1e-5) and rank0 > one_rank  # each negative adds to the sum
    # Rank 1 holds image 2 alone (first anchor 2): a2 and b2 against images 0 and 1 of rank 0.
    rank1 = (_loss(0.8, [-1.0, -0.6, 0.0, 0.6], t) + _loss(0.8, [-0.8, -0.96, -0.6, 0.0], t)) / 2
    loss1, _ = nt_xent(gathered_a, gathered_b, 2, 1, t)
    assert float(loss1) == pytest.approx(rank1, rel=1e-5)


def _unlabeled_records(folder, images: int, size: int = 64) -> str:
    """A records folder whose manifest lists no labels and whose records carry none (an unlabeled ingest)."""
    import cv2

    from medtl.data.manifest import Manifest, Shard, SplitInfo, write_manifest
    from medtl.data.records import encode_example
    from medtl.tf import tf

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    if images:
        with tf.io.TFRecordWriter(os.path.join(folder, "train-00000-of-00001.tfrecord")) as writer:
            for i in range(images):
                png = cv2.imencode(".png", rng.integers(0, 256, (size, size), dtype=np.uint8))[1].tobytes()
                writer.write(encode_example(png, [], [], f"p{i}", f"k{i}"))
        splits["train"] = SplitInfo(records=images, patients=images,
                                    shards=(Shard("train-00000-of-00001.tfrecord", images),))
    else:
        splits["train"] = SplitInfo()
    write_manifest(folder, Manifest(labels=(), stored_image_size=size, bit_depth=8, splits=splits))
    return folder


def test_views_stream_needs_no_labels(tmp_path):
    from medtl.config import load_config
    from medtl.data.pipeline import build_views_dataset

    records = _unlabeled_records(str(tmp_path / "records"), 12)
    cfg = load_config(TINY, [f"data.records={records}", "pretrain.method=simclr", "train.batch_size=4"])
    views = next(iter(build_views_dataset(cfg))).numpy()
    assert views.shape == (8, 64, 64, 3) and views.dtype == np.float32  # 4 images x 2 views, gray to RGB
    assert 0 <= views.min() and views.max() <= 255
    assert not np.array_equal(views[:4], views[4:])  # views a and b are augmented independently


def test_simclr_bad_inputs(records, tmp_path):
    run = str(tmp_path / "run")
    assert_user_error(_pretrain(records, run, "--set", "train.batch_size=1"), "train.batch_size=1",
                      "simclr", "set train.batch_size=2 or more", exit_code=2)
    empty = _unlabeled_records(str(tmp_path / "empty"), 0)
    assert_user_error(_pretrain(empty, run), f"records folder {empty} holds no images", "medtl ingest",
                      exit_code=2)
    assert_user_error(_pretrain(records, run, "--set", "pretrain.method=moco"), "not built yet", exit_code=2)
    assert not os.path.exists(os.path.join(run, "base.weights.h5"))


@pytest.mark.slow
def test_pretrain_simclr_on_unlabeled_dicoms_writes_a_base_that_train_starts_from(records, tmp_path):
    """SimCLR on an unlabeled DICOM archive, killed in its second epoch and resumed; then train from its base."""
    from medtl.data.manifest import read_manifest
    from medtl.data.synth import synthesize

    # A hospital's archive: DICOM studies without labels, ingested as such (patient ids from the DICOM tags).
    synthesize(str(tmp_path / "archive"), 40, seed=3, size=64, dicom=True)
    unlabeled = str(tmp_path / "unlabeled")
    ingested = run_cli("ingest", "--images", tmp_path / "archive" / "images", "--unlabeled", "--out", unlabeled,
                       "--image-size", 64)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert not read_manifest(unlabeled, unlabeled_ok=True).labeled
    assert_user_error(run_cli("pretrain", "--config", TINY, "--workdir", str(tmp_path / "sup"), "--set",
                              f"data.records={unlabeled}", "--set", "pretrain.method=supervised"),
                      f"records folder {unlabeled} is unlabeled", "simclr")

    # Two epochs, the process killed (SIGKILL, no clean-up) at the second step of the second; the same command
    # then resumes after epoch 1 and runs epoch 2 alone.
    run = str(tmp_path / "pre")
    two_epochs = ("--set", "phases=[{name: all, epochs: 2, learning_rate: 0.001, trainable: all, "
                           "train_batch_norm: true}]")
    steps = read_manifest(unlabeled, unlabeled_ok=True).records("train") // 8  # train.batch_size 8, whole batches
    killed = _pretrain(unlabeled, run, *two_epochs, env=cli_env(MEDTL_FAULTS=f"kill:rank=0,step={steps + 1}"))
    out = killed.stdout + killed.stderr
    assert killed.returncode != 0 and f"SIGKILLs itself before global step {steps + 1}" in out, out[-3000:]
    assert f"{2 * 8 - 2} negatives per anchor gathered from 1 rank(s)" in out
    assert "simclr epoch 1 (phase 'all' 1/2): contrastive loss" in out and "positive-pair top-1" in out
    base = os.path.join(run, "base.weights.h5")
    assert not os.path.exists(base)
    result = _pretrain(unlabeled, run, *two_epochs)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"pretrain: resuming {run} after epoch 1" in out
    assert "simclr epoch 2 (phase 'all' 2/2)" in out and "simclr epoch 1 (" not in out
    assert result.stdout.strip().splitlines()[-1] == base
    meta = json.load(open(base + ".json"))
    assert meta["method"] == "simclr" and meta["epochs"] == 2 and meta["backbone"] == "MobileNetV3Small"
    assert meta["records_digest"] == read_manifest(unlabeled, unlabeled_ok=True).digest()
    rows = [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]
    assert [row["epoch"] for row in rows] == [0, 1]  # each epoch once
    assert all(math.isfinite(row["loss"]) and row["negatives_per_anchor"] == 14 for row in rows)

    # The labeled job at another input size than the pretraining's: the base loads, with one warning.
    target = run_cli("train", "--config", TINY, "--workdir", str(tmp_path / "target"), "--set",
                     f"data.records={records}", "--set", f"model.weights={base}", "--set", "data.image_size=32",
                     *HEAD_ONLY_SET)
    assert target.returncode == 0, target.stderr[-3000:]
    warnings = [line for line in target.stderr.splitlines() if "pretrained at 64 px" in line]
    assert len(warnings) == 1 and "builds 32 px" in warnings[0] and "data.image_size=64" in warnings[0], warnings


@pytest.mark.slow
def test_pretrain_simclr_two_ranks_gathers_negatives(records, tmp_path):
    run = str(tmp_path / "pre")
    result = _pretrain(records, run, launcher=launcher_argv("horovodrun"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "global batch 16 (8 per rank, 2 views each)" in out
    assert f"{2 * 16 - 2} negatives per anchor gathered from 2 rank(s)" in out
    assert "weights identical on 2 rank(s)" in out
    assert out.count("pretrain: wrote") == 1
    meta = json.load(open(os.path.join(run, "base.weights.h5.json")))
    assert meta["method"] == "simclr" and meta["epochs"] == 1
    assert [json.loads(line)["ranks"] for line in open(os.path.join(run, "history.jsonl"))] == [2]


# Run by horovodrun -np 2: the NT-Xent gradient with each rank's 2 images' projections gathered (dist.rows_gatherer),
# averaged over ranks as the train step averages gradients, against one process holding all 4 images.
GATHER_GRADIENT_CHECK = textwrap.dedent("""
    import numpy as np
    from medtl import dist
    from medtl.models.contrastive import nt_xent
    from medtl.tf import tf

    ctx = dist.init()
    rng = np.random.default_rng(0)
    view_a, view_b = (rng.normal(size=(4, 3)).astype("float32") for _ in range(2))
    weights = tf.Variable(rng.normal(size=(3, 2)).astype("float32"))
    gather, mine = dist.rows_gatherer(ctx, "check"), slice(2 * ctx.rank, 2 * ctx.rank + 2)

    @tf.function
    def averaged_gradient():
        with tf.GradientTape() as tape:
            pairs = gather(tf.concat([tf.matmul(view_a[mine], weights), tf.matmul(view_b[mine], weights)], 1))
            loss, _ = nt_xent(*tf.split(pairs, 2, axis=1), 2 * ctx.rank, 2, 0.5)
        return ctx.hvd.allreduce(tape.gradient(loss, weights), op=ctx.hvd.Average)

    with tf.GradientTape() as tape:
        loss, _ = nt_xent(tf.matmul(view_a, weights), tf.matmul(view_b, weights), 0, 4, 0.5)
    difference = np.abs(averaged_gradient().numpy() - tape.gradient(loss, weights).numpy()).max()
    print(f"difference {difference:.3g}")
""")


@pytest.mark.slow
def test_gathered_gradient_is_the_global_batch_gradient(tmp_path):
    """Horovod's own allgather gradient averages over ranks: there this check found a difference of 0.77."""
    script = tmp_path / "check.py"
    script.write_text(GATHER_GRADIENT_CHECK)
    result = subprocess.run(launcher_argv("horovodrun") + [sys.executable, str(script)], capture_output=True,
                            text=True, env=cli_env(PYTHONPATH=REPO), timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = rank_lines(result.stdout, "difference ")
    assert sorted(lines) == [0, 1], result.stdout[-2000:]
    assert all(float(found[0].split()[1]) < 1e-5 for found in lines.values()), lines
