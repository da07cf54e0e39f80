"""Planted identifiers never reach a shared artefact or a log line, and the input folder is never written
(checks 7, 7b, 13).

Identifiers are planted in DICOM tags, dates and UIDs, and in the file and folder names of a PACS export
(MRN/ACCESSION.dcm). Every command runs at debug log level: ingest (whole, and partitioned into two
workers and a finalize), train on 1 rank and on 2 (horovodrun) with data.cache, evaluate with the
bootstrap, calibration and subgroups by every kept field (sex, age band, view, modality, manufacturer, salted
site), compare, export with its model card, predict (the default CSV is the user's own file beside the inputs,
and names files; --ids-only is searched) and search. Then every file medtl wrote (records, .parts/*/part.json as
the workers left them, run folders, caches, reports, export, search DB and feature cache) and every log
stream of every rank is byte-searched once (helpers.Corpus says how bytes are counted). Check 7b ingests
the same planted export with --unlabeled (no labels table) and searches its records and log the same way.
"""
import csv
import io
import os
import shutil
import stat
import time
import zipfile

import pytest

from conftest import assert_user_error
from medtl.data.fields import SAFE_FIELDS
from medtl.data.records import ALLOWED_FEATURES
from reliability.helpers import (HOROVODRUN, JOBS, PLANTED_KINDS, TINY, Corpus, damage_two_studies, env, pacs_layout,
                                 report, run_cli, search_blobs, tree_digest)

pytestmark = pytest.mark.slow

SALT = "planted-salt-value-0123456789"
DEBUG = {"MEDTL_ID_SALT": SALT, "MEDTL_LOG_LEVEL": "debug", "TF_CPP_MIN_LOG_LEVEL": "0"}
TINY_RUN = ("data.image_size=32", "train.batch_size=4", "phases.0.epochs=1", "phases.1.epochs=1")
# Calibration, and subgroups by every kept field (site: the salted institution) with every group reported.
CLINICAL = ("--set", "evaluate.calibration=isotonic", "--set", f"evaluate.subgroups=[{','.join(SAFE_FIELDS)}]",
            "--set", "evaluate.subgroup_min_patients=1")


def _read_only(folder) -> bool:
    """chmod the tree read-only; True when that actually stops writes (not as root)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    probe = os.path.join(folder, ".write-probe")
    try:
        open(probe, "w").close()
    except PermissionError:
        return True
    os.remove(probe)
    return False


class _Commands:
    """Runs medtl commands at debug level, keeping each one's whole output (every rank's) and its time."""

    def __init__(self):
        self.logs: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, name, *args, launcher=None, ok=True):
        started = time.monotonic()
        r = run_cli(*args, env=env(**DEBUG), launcher=launcher)
        self.seconds[name] = time.monotonic() - started
        self.logs[name] = r.stdout + r.stderr
        if ok:
            assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        return r


def _ingest_all(cmd, studies, art, user) -> tuple:
    images, labels = studies / "images", studies / "labels.csv"
    common = ("--images", images, "--labels", labels, "--image-size", 32, "--keep-fields",
              ",".join(SAFE_FIELDS), "--max-bad-fraction", 0.1)
    assert_user_error(cmd("ingest inside input", "ingest", *common, "--out", images / "records", ok=False),
                      "is inside the input folder", "read-only")
    assert_user_error(cmd("private map in records", "ingest", *common, "--out", art / "records", "--private-map",
                          art / "records" / "map.csv", ok=False), "--private-map", "inside the records folder")
    cmd("ingest", "ingest", *common, "--out", art / "records", "--private-map", user / "private-map.csv")
    parted = art / "records-2-workers"
    for w in (0, 1):
        cmd(f"ingest worker {w}", "ingest", *common, "--out", parted, "--worker-index", w, "--num-workers", 2,
            "--private-map", user / "private-map-2.csv")
    shutil.copytree(parted / ".parts", art / "parts-as-the-workers-left-them")  # finalize removes .parts
    cmd("ingest-finalize", "ingest-finalize", *common, "--out", parted, "--num-workers", 2,
        "--private-map", user / "private-map-2.csv")
    return art / "records", parted


def _train_evaluate_compare(cmd, art, records, parted):
    assert_user_error(cmd("train inside records", "train", "--config", TINY, "--workdir", records / "run",
                          "--set", f"data.records={records}", ok=False), "inside the records folder")
    runs = {1: (art / "run-1-rank", records, None), 2: (art / "run-2-ranks", parted, HOROVODRUN)}
    for ranks, (run, data, launcher) in runs.items():
        sets = [f"data.records={data}", f"data.cache={art / f'tfdata-cache-{ranks}'}", *TINY_RUN]
        cmd(f"train {ranks} rank(s)", "train", "--config", TINY, "--workdir", run,
            *[a for s in sets for a in ("--set", s)], launcher=launcher)
        cmd(f"evaluate {ranks} rank(s)", "evaluate", "--workdir", run, "--split", "test", "--out",
            art / f"report-{ranks}", "--set", "evaluate.bootstrap=50", *CLINICAL)
    cmd("compare", "compare", art / "report-1", art / "report-2", "--out", art / "compare.csv")
    return runs[1][0]


def _export_predict_search(cmd, art, user, studies, run, records):
    cmd("export", "export", "--workdir", run, "--out", art / "model", *CLINICAL)  # with its model card
    cmd("predict", "predict", "--model", art / "model", "--images", studies / "images", "--out",
        user / "predictions.csv")
    cmd("predict --ids-only", "predict", "--model", art / "model", "--images", studies / "images", "--out",
        art / "predictions-ids.csv", "--ids-only")
    cmd("search", "search", "--config", TINY, "--space", os.path.join(JOBS, "search", "tiny.yaml"), "--budget", 1,
        "--workdir", art / "search", "--set", f"data.records={records}", "--set", "data.image_size=32",
        "--set", "phases.0.epochs=1", "--set", f"search.feature_cache={art / 'feature-cache'}")


def _self_check(corpus: Corpus, needles: dict[str, str]) -> int:
    """Plant known strings in copies of real artefacts and prove the search finds each, in each form:
    a folder name in a binary (a checkpoint), a date in a text (metrics.json), a UID as UTF-16-LE in a
    log, and a file name only inside a deflated member of a copy of predictions.npz (not in its raw
    bytes, so only opening the container finds it). The copies are searched on their own."""
    pick = {kind: sorted(n for n, k in needles.items() if k == kind)[0] for kind in PLANTED_KINDS}
    weights = next(n for n in corpus.blobs if n.endswith(".weights.h5"))
    metrics = next(n for n in corpus.blobs if n.endswith("metrics.json"))
    log = next(n for n in corpus.blobs if n.startswith("log: train 2"))
    npz = next(n for n in corpus.blobs if n.endswith("predictions.npz"))
    middle = lambda blob, plant: blob[: len(blob) // 2] + plant + blob[len(blob) // 2:]  # noqa: E731
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(corpus.blobs[npz])) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for member in src.namelist():
            z.writestr(member, src.read(member) + (pick["file name"].encode() if member == "key.npy" else b""))
    assert pick["file name"].encode() not in buf.getvalue()
    plants = {"copy of " + weights: pick["folder name"], "copy of " + metrics: pick["date"],
              "copy of " + log: pick["uid"], "copy of " + npz + "!key.npy": pick["file name"]}
    copies = Corpus()
    copies.add("copy of " + weights, middle(corpus.blobs[weights], pick["folder name"].encode()))
    copies.add("copy of " + metrics, middle(corpus.blobs[metrics], f' "{pick["date"]}" '.encode()))
    copies.add("copy of " + log, middle(corpus.blobs[log], pick["uid"].encode("utf-16-le")))
    copies.add("copy of " + npz, buf.getvalue())
    found = search_blobs(needles, copies.blobs)
    expected = {}  # each planted string, and every needle inside it (a file name holds the accession number)
    for where, planted in plants.items():
        for needle in needles:
            if needle in planted:
                expected.setdefault(needle, []).append(where)
    assert {n: sorted(w) for n, w in found.items()} == expected, found
    return len(plants)


def test_no_identifier_reaches_any_artefact_and_input_stays_untouched(dicom_studies, tmp_path):
    started = time.monotonic()
    studies, art, user = tmp_path / "studies", tmp_path / "artefacts", tmp_path / "user"
    planted = pacs_layout(dicom_studies, str(studies))
    needles = {value: kind for kind in PLANTED_KINDS for value in planted[kind]}
    needles[SALT] = "salt"
    assert len(needles) > 400 and all(planted[kind] for kind in PLANTED_KINDS)
    images = studies / "images"
    with open(studies / "labels.csv", newline="") as fh:
        files = sorted(row["Image Index"] for row in csv.DictReader(fh))
    assert all("/" in f for f in files)  # MRN/ACCESSION.dcm
    truncated, burned = damage_two_studies(images, files, cut=2000)
    enforced = _read_only(studies)
    before = tree_digest(studies)
    user.mkdir()
    art.mkdir()

    cmd = _Commands()
    records, parted = _ingest_all(cmd, studies, art, user)
    run = _train_evaluate_compare(cmd, art, records, parted)
    _export_predict_search(cmd, art, user, studies, run, records)
    assert tree_digest(studies) == before, "the input folder changed"

    # Quarantine rows name studies by salted id; only the user's private map leads back to the files.
    from medtl.data.deid import salted_hash

    ids = {salted_hash(SALT.encode(), f): f for f in files}
    for folder in (records, parted):
        with open(folder / "quarantine.csv", newline="") as fh:
            assert {ids[row["study"]]: row["reason"] for row in csv.DictReader(fh)} == {
                truncated: "truncated_pixel_data", burned: "burned_in_annotation"}
    for name in ("private-map.csv", "private-map-2.csv"):
        with open(user / name, newline="") as fh:
            assert {row["study"]: row["path"] for row in csv.DictReader(fh)} == {
                k: os.path.join(images, f) for k, f in ids.items()}
    # predict's default CSV is the user's own file beside the inputs: it names files (docs/export-predict.md).
    with open(user / "predictions.csv", newline="") as fh:
        assert sorted(row["file"] for row in csv.DictReader(fh)) == files
    with open(art / "predictions-ids.csv", newline="") as fh:
        assert sorted(row["study"] for row in csv.DictReader(fh)) == sorted(ids)

    corpus = Corpus()
    corpus.add_tree(art)
    for name, text in cmd.logs.items():
        corpus.add(f"log: {name}", text.encode())
    assert any(k.endswith(".weights.h5") for k in corpus.blobs) and any("saved_model.pb" in k for k in corpus.blobs)
    assert any(k.endswith("part.json") for k in corpus.blobs) and any("study.db" in k for k in corpus.blobs)
    assert any("tfdata-cache-2" in k for k in corpus.blobs) and any("feature-cache" in k for k in corpus.blobs)
    assert any("!" in k for k in corpus.blobs), "a container (predictions.npz) was opened"
    assert any(k.endswith("MODEL_CARD.md") for k in corpus.blobs) and any(k.endswith("index.html") for k in corpus.blobs)
    card = corpus.blobs[str(art / "model" / "MODEL_CARD.json")].decode()
    assert '"site-' in card and '"age_band"' in card  # the card lists the salted site and the age bands
    assert "[1]" in cmd.logs["train 2 rank(s)"], "rank 1's output was captured"
    assert corpus.bytes_counted > 1_000_000
    leaks = corpus.find(needles)
    assert not leaks, {needle: (needles[needle], where) for needle, where in leaks.items()}
    proven = _self_check(corpus, needles)
    print("seconds per command:", {k: round(v) for k, v in cmd.seconds.items()})

    from medtl.tf import tf

    shard = next(f for f in os.listdir(records) if f.startswith("train-"))
    for record in tf.data.TFRecordDataset(str(records / shard)).take(3):  # records hold allow-listed features only
        assert set(tf.train.Example.FromString(record.numpy()).features.feature) <= set(ALLOWED_FEATURES)
    counts = {kind: len(planted[kind]) for kind in PLANTED_KINDS}
    report("7. Identifier leak", f"{len(needles)} identifying values planted in 40 DICOM studies filed as "
           f"MRN/ACCESSION.dcm ({', '.join(f'{n} {k}s' for k, n in counts.items())}, + the salt); one study "
           "truncated, one BurnedInAnnotation=YES; at debug log level: ingest whole and in 2 workers + finalize, "
           "train on 1 rank and on 2 (horovodrun) with data.cache, evaluate with the bootstrap, calibration and "
           "subgroups by every kept field, compare, export with its model card, "
           "predict (--ids-only searched; the default CSV is the user's own file) and search",
           f"none found in {corpus.files} files, their container members and {len(cmd.logs)} command logs (all "
           "ranks): shards, manifest, quarantine (salted ids only), part.json, checkpoints, tf.data caches, "
           "reports, run index, SavedModel, model card, study DB, feature cache; the self-check finds each of "
           f"{proven} strings planted in artefact copies; {time.monotonic() - started:.0f} s",
           identifiers_planted=len(needles), bytes_searched=corpus.bytes_counted)
    how = ("chmod a-w enforced" if enforced else "running as root, so chmod a-w does not stop writes: proven by "
           "hashing the input tree before and after, and by the refusal")
    report("13. Read-only input", f"input tree chmod a-w ({how}); every command above; ingest --out inside the "
           "input; train --workdir inside the records",
           f"all succeeded; the {len(before)} input files are byte-identical afterwards; both writes into inputs "
           "refused with one error line", input_files_hashed=len(before))


def test_unlabeled_ingest_leaks_no_identifier(dicom_studies, tmp_path):
    """The same planted PACS export ingested with --unlabeled (patients from the DICOM PatientID, which is
    also the folder name) at debug level: nothing planted reaches the records, the manifest, the quarantine
    or the log, and the private map stays where the user put it, outside the records."""
    started = time.monotonic()
    studies, art, user = tmp_path / "studies", tmp_path / "artefacts", tmp_path / "user"
    planted = pacs_layout(dicom_studies, str(studies))
    needles = {value: kind for kind in PLANTED_KINDS for value in planted[kind]}
    needles[SALT] = "salt"
    images = studies / "images"
    with open(studies / "labels.csv", newline="") as fh:
        files = sorted(row["Image Index"] for row in csv.DictReader(fh))
    truncated, burned = damage_two_studies(images, files, cut=2000)
    os.remove(studies / "labels.csv")  # no table: the files alone, as an archive export comes
    before = tree_digest(studies)

    cmd = _Commands()
    records = art / "records-unlabeled"
    cmd("ingest --unlabeled", "ingest", "--images", images, "--unlabeled", "--out", records, "--image-size", 32,
        "--keep-fields", ",".join(SAFE_FIELDS), "--max-bad-fraction", 0.1,
        "--private-map", user / "private-map.csv")
    assert tree_digest(studies) == before, "the input folder changed"

    from medtl.data.deid import salted_hash

    ids = {salted_hash(SALT.encode(), f): f for f in files}
    with open(records / "quarantine.csv", newline="") as fh:
        assert {ids[row["study"]]: row["reason"] for row in csv.DictReader(fh)} == {
            truncated: "truncated_pixel_data", burned: "burned_in_annotation"}
    with open(user / "private-map.csv", newline="") as fh:
        assert {row["study"]: row["path"] for row in csv.DictReader(fh)} == {
            k: os.path.join(images, f) for k, f in ids.items()}
    names = set(os.listdir(records))
    assert {"manifest.json", "quarantine.csv"} <= names and all(
        n in ("manifest.json", "quarantine.csv") or n.endswith(".tfrecord") for n in names), names
    assert "ingest: study " in cmd.logs["ingest --unlabeled"]  # debug level was on: a line per study

    corpus = Corpus()
    corpus.add_tree(art)
    corpus.add("log: ingest --unlabeled", cmd.logs["ingest --unlabeled"].encode())
    leaks = corpus.find(needles)
    assert not leaks, {needle: (needles[needle], where) for needle, where in leaks.items()}
    from medtl.tf import tf

    patients = set()
    for shard in sorted(f for f in os.listdir(records) if f.endswith(".tfrecord")):
        for record in tf.data.TFRecordDataset(str(records / shard)):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            assert set(feature) <= set(ALLOWED_FEATURES) and not feature["labels"].int64_list.value
            patients.add(feature["patient"].bytes_list.value[0])
    assert 1 < len(patients) < len(files) - 2  # patients from PatientID, not one per image
    report("7b. Identifier leak, unlabeled ingest", f"the same {len(needles)} planted values and PACS layout "
           "(MRN/ACCESSION.dcm, one study truncated, one BurnedInAnnotation=YES), without a labels table: "
           "`medtl ingest --unlabeled` at debug log level, patients from the DICOM PatientID",
           f"none found in {corpus.files} files and the log; records carry no labels and {len(patients)} salted "
           f"patients; quarantine by salted id; the private map only where the user put it; "
           f"{time.monotonic() - started:.0f} s", identifiers_planted=len(needles), bytes_searched=corpus.bytes_counted)
