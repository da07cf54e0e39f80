"""Grad-CAM and external validation through the real CLI, on a model trained where each finding is known.

Synthetic studies with two findings drawn where the test knows: a filled disk (Disk) and a ring (Ring),
anywhere in training images, on backgrounds of varied exposure. `medtl train` learns them (MobileNetV2 at
128 px, whose 4 x 4 feature map gives each quadrant 2 x 2 cells; one phase of 4 epochs with BatchNorm training;
ResNet50V2 learned them in 2 epochs but took 2.5 times as long);
in the maps of new studies whose disk sits in the top-left quadrant and ring in the top-right, the
finding's quadrant must be the hottest, and hold most of the map. Another "site" names Disk "Solid Disk", has no Ring and a label of its own; a label
map scores the export there, beside the internal test set.
"""
import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from scipy.stats import binomtest, wilcoxon

from medtl.data import deid

from conftest import assert_user_error, chromium_probe, run_cli

pytestmark = pytest.mark.slow

SIZE = 128
LABELS = ("Disk", "Ring")
# Where a finding is drawn in the "quadrant" studies: (rows, columns) of its quadrant.
# Not on a diagonal: a transposed or mirrored map moves at least one of them.
QUADRANT = {"Disk": (slice(0, SIZE // 2), slice(0, SIZE // 2)), "Ring": (slice(0, SIZE // 2), slice(SIZE // 2, None))}
JOB = f"""
seed: 0
data: {{records: "", image_size: {SIZE}, channels: 3, shuffle_buffer: 1024, augment: [], deterministic: true}}
model: {{backbone: MobileNetV2, weights: none, batchnorm_momentum: 0.9, head: {{pooling: avg, dense: [], dropout: 0.0}}}}
train: {{batch_size: 16, precision: float32}}
phases: [{{name: all, epochs: 4, learning_rate: 1.0e-3, trainable: all, train_batch_norm: true}}]
evaluate: {{bootstrap: 200, saliency_examples: 2}}
"""


def draw_studies(folder, n: int, seed: int, quadrants: bool, subfolders=("",)) -> list[dict]:
    """n 8-bit PNG studies at SIZE px under folder/images (spread over `subfolders`); returns per study
    {'file', 'patient', 'Disk', 'Ring'}. A finding is present with probability 1/2: anywhere, or with
    `quadrants` inside its QUADRANT. Each background's exposure differs (mean 60-120), so that a finding is
    told by its shape and contrast, not by the image's brightness. Sizes scale with SIZE."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    half = SIZE // 2
    rows = []
    for i in range(n):
        image = cv2.GaussianBlur(rng.normal(90 + rng.uniform(-30, 30), 12, (SIZE, SIZE)), (0, 0), 1.5 * SIZE / 64)
        present = rng.random(2) < 0.5
        for k, name in enumerate(LABELS):
            if not present[k]:
                continue
            radius = rng.uniform(0.12, 0.18) * SIZE
            if quadrants:
                top, left = (q.start or 0 for q in QUADRANT[name])
                cy, cx = top + rng.uniform(0.3, 0.7) * half, left + rng.uniform(0.3, 0.7) * half
            else:
                cy, cx = rng.uniform(radius, SIZE - radius, 2)
            d = np.hypot(yy - cy, xx - cx)
            image += 110 * ((d <= radius) if name == "Disk" else ((d <= radius) & (d >= radius - 0.05 * SIZE)))
        file = os.path.join(subfolders[i % len(subfolders)], f"study{i:04d}.png")
        os.makedirs(os.path.dirname(os.path.join(folder, "images", file)), exist_ok=True)
        cv2.imwrite(os.path.join(folder, "images", file), np.clip(image, 0, 255).astype(np.uint8))
        rows.append({"file": file, "patient": f"P{seed}-{i:04d}", "Disk": int(present[0]), "Ring": int(present[1])})
    return rows


def write_labels(path, rows: list[dict], columns: dict) -> None:
    """A multihot CSV: image, patient, then `columns` (CSV column -> study key, or None for random 0/1)."""
    rng = np.random.default_rng(3)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient", *columns])
        for row in rows:
            writer.writerow([row["file"], row["patient"]] + [row[key] if key else int(rng.random() < 0.3)
                                                             for key in columns.values()])


def _ingest(folder, out, **fractions) -> str:
    from medtl.data.ingest import IngestOptions, ingest

    ingest(IngestOptions(images=str(folder / "images"), labels=str(folder / "labels.csv"), out=str(out),
                         format="multihot", image_size=SIZE, bit_depth=8, progress=False, **fractions))
    return str(out)


def _metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The training site: 600 studies, findings anywhere, ingested; and the job config."""
    root = tmp_path_factory.mktemp("site")
    write_labels(root / "labels.csv", draw_studies(root, 600, seed=0, quadrants=False),
                 {"Disk": "Disk", "Ring": "Ring"})
    (root / "job.yaml").write_text(JOB)
    return {"records": _ingest(root, root / "records"), "job": str(root / "job.yaml")}


@pytest.fixture(scope="module")
def run(site, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    r = run_cli("train", "--config", site["job"], "--workdir", workdir, "--set", f"data.records={site['records']}")
    assert r.returncode == 0, r.stderr[-3000:]
    return str(workdir)


@pytest.fixture(scope="module")
def internal_report(run, tmp_path_factory):
    """The run's test split with saliency on; the run folder keeps its figures for the export."""
    out = tmp_path_factory.mktemp("internal")
    r = run_cli("evaluate", "--workdir", run, "--split", "test", "--out", out, "--set", "evaluate.saliency=true")
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


@pytest.fixture(scope="module")
def exported(run, internal_report, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    r = run_cli("export", "--workdir", run, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "internal test metrics: macro AUROC" in r.stderr
    return str(out)


@pytest.fixture(scope="module")
def other_site(tmp_path_factory):
    """Another site: 160 studies in two ward folders, findings in their quadrants; Disk is "Solid Disk"
    there, Ring is not labelled, and "Fracture" is a label of its own."""
    root = tmp_path_factory.mktemp("other")
    rows = draw_studies(root, 160, seed=1, quadrants=True, subfolders=("north", "south"))
    write_labels(root / "labels.csv", rows, {"Solid Disk": "Disk", "Fracture": None})
    (root / "map.yaml").write_text("Disk: Solid Disk\n")
    return {"root": root, "rows": rows, "map": str(root / "map.yaml"),
            "records": _ingest(root, root / "records", val_fraction=0.1, test_fraction=0.6)}


def _mass_in_quadrant(heatmap_png: str, label: str) -> float:
    heat = cv2.imread(heatmap_png, cv2.IMREAD_GRAYSCALE).astype(np.float64)
    assert heat.shape == (SIZE, SIZE)
    rows, cols = QUADRANT[label]
    return heat[rows, cols].sum() / max(heat.sum(), 1e-9)


def test_gradcam_points_at_the_finding(exported, other_site, tmp_path):
    """predict --saliency: overlays named like the CSV rows; each finding's map lies in its quadrant."""
    sal = tmp_path / "saliency"
    r = run_cli("predict", "--model", exported, "--images", other_site["root"] / "images",
                "--out", tmp_path / "preds.csv", "--saliency", sal)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "burned-in text" in r.stderr
    csv_rows = {row["file"]: row for row in csv.DictReader(open(tmp_path / "preds.csv"))}
    assert set(csv_rows) == {row["file"] for row in other_site["rows"]}
    quadrants = [(slice(0, SIZE // 2), slice(0, SIZE // 2)), (slice(0, SIZE // 2), slice(SIZE // 2, None)),
                 (slice(SIZE // 2, None), slice(0, SIZE // 2)), (slice(SIZE // 2, None), slice(SIZE // 2, None))]
    shares, hottest = {label: [] for label in LABELS}, {label: [] for label in LABELS}
    studies = dict.fromkeys(LABELS, 0)
    for study in other_site["rows"]:
        folder = sal / study["file"]  # north/study0000.png/
        assert sorted(os.listdir(folder)) == sorted(f"{n}{ext}" for n in LABELS for ext in (".png", ".heatmap.png"))
        overlay = cv2.imread(str(folder / "Disk.png"))
        assert overlay.shape == (SIZE, SIZE, 3)
        present = [label for label in LABELS if study[label]]
        if len(present) != 1:
            continue  # with both findings, a weak label's map may follow the other finding: the model's doing
        label = present[0]
        heat = cv2.imread(str(folder / f"{label}.heatmap.png"), cv2.IMREAD_GRAYSCALE).astype(np.float64)
        assert heat.shape == (SIZE, SIZE)
        studies[label] += 1
        if heat.max() > 0:  # a map 0 everywhere: no region raises the logit (the model missed it), no place to judge
            shares[label].append(_mass_in_quadrant(str(folder / f"{label}.heatmap.png"), label))
            hottest[label].append(quadrants[int(np.argmax([heat[q].sum() for q in quadrants]))] == QUADRANT[label])
    for label in LABELS:
        found = np.array(shares[label])
        # How many maps have heat is the model's sensitivity, not Grad-CAM's; localisation is judged on at
        # least 10 maps with heat, and half of the studies (measured: none or one of ~40 empty per label).
        assert studies[label] > 25 and len(found) >= max(10, 0.5 * studies[label]), (label, len(found), studies[label])
        # The hottest quadrant, against chance (1 in 4), by a one-sided binomial test: a map that ignores the
        # finding, or is transposed, mirrored or offset, puts it elsewhere (measured: 100% of the maps).
        p_chance = binomtest(int(np.sum(hottest[label])), len(hottest[label]), 0.25, alternative="greater").pvalue
        assert p_chance < 0.01, (label, np.mean(hottest[label]), len(hottest[label]), p_chance)
        # and in most maps (a bound below the 100% measured, which p < 0.01 alone would let fall to ~40%).
        assert np.mean(hottest[label]) >= 0.75, (label, np.mean(hottest[label]))
        # Most of the map's mass in the finding's quadrant: its share against 0.5, by a one-sided signed-rank
        # test. Measured on 3 models (seeds 0, 3, 4): medians Disk 0.60-0.65, Ring 0.58-0.70; p10 0.48-0.63;
        # the hottest quadrant was the finding's in 100% of the maps, and every map had heat. Training follows
        # the float order of its ops unless data.deterministic: one suite run's model put a median 0.50 of the
        # Disk maps' mass there (p = 0.16; the hottest quadrant test passed). With deterministic ops (JOB):
        # seeds 0 and 4 gave medians Disk 0.57 and 0.64, Ring 0.58 and 0.60, p <= 8e-9, seed 3 passed too.
        # (At 64 px, a 2 x 2 map, two models trained alike put 0.40-0.49 there: the cells beside it were warm too.)
        p_most = wilcoxon(found - 0.5, alternative="greater").pvalue
        assert p_most < 0.01, (label, np.percentile(found, [10, 50, 90]), p_most)
    # The overlay is the study where the map is cold and coloured on the finding.
    # (The first Disk-only study whose map has cold and hot pixels: a diffuse map can be warm everywhere.)
    def heat_of(study):
        return cv2.imread(str(sal / study["file"] / "Disk.heatmap.png"), cv2.IMREAD_GRAYSCALE)

    study = next(s for s in other_site["rows"] if s["Disk"] and not s["Ring"]
                 and (heat_of(s) < 10).any() and (heat_of(s) > 200).any())
    heat = heat_of(study)
    overlay = cv2.imread(str(sal / study["file"] / "Disk.png")).astype(int)
    spread = overlay.max(axis=2) - overlay.min(axis=2)
    assert spread[heat < 10].max() <= 1 and spread[heat > 200].min() > 20


def test_predict_saliency_by_salted_id_and_an_older_export(exported, other_site, tmp_path):
    """--ids-only names the overlay folders by salted study id only; an export without the saliency
    signatures (as made before them) is refused in one line."""
    picked = [row["file"] for row in other_site["rows"][:2]]  # north/..., south/...
    listing = tmp_path / "two" / "list.csv"  # beside copies of the two, so its paths are the records' own
    for f in picked:
        os.makedirs(os.path.dirname(tmp_path / "two" / f), exist_ok=True)
        shutil.copy(other_site["root"] / "images" / f, tmp_path / "two" / f)
    listing.write_text("path\n" + "".join(f"{f}\n" for f in picked))
    sal = tmp_path / "sal"
    r = run_cli("predict", "--model", exported, "--images", listing, "--out", tmp_path / "p.csv", "--ids-only",
                "--saliency", sal)
    assert r.returncode == 0, r.stderr[-3000:]
    studies = [row["study"] for row in csv.DictReader(open(tmp_path / "p.csv"))]
    salt = deid.load_salt()  # $MEDTL_ID_SALT, as bytes
    assert studies == [deid.salted_hash(salt, f) for f in picked]
    assert sorted(os.listdir(sal)) == sorted(studies)
    written = [os.path.relpath(os.path.join(d, f), sal) for d, _, files in os.walk(sal) for f in files]
    assert len(written) == 2 * 2 * len(LABELS)
    for text in written + [r.stderr]:
        assert "study0" not in text and "north" not in text and "south" not in text, text

    older = tmp_path / "older"
    shutil.copytree(exported, older)
    meta_file = older / "assets" / "medtl_export.json"
    meta = json.loads(meta_file.read_text())
    for key in ("gradcam_layer", "run_folder", "internal_test"):
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    r = run_cli("predict", "--model", older, "--images", listing, "--out", tmp_path / "q.csv", "--saliency", sal)
    assert_user_error(r, f"export {older} has no saliency signatures", "re-export", exit_code=2)


def test_internal_report_has_saliency_and_the_export_carries_its_figures(internal_report, exported, run):
    from medtl.evaluate.report import read_predictions
    from medtl.serve.meta import read_meta

    m = _metrics(internal_report)
    preds = read_predictions(internal_report)
    _check_saliency_examples(m, preds)
    page = open(os.path.join(internal_report, "report.html")).read()
    assert '<section id="saliency"' in page and "This report shows image pixels" in page
    assert page.count("data:image/png;base64,") == 6 + len(LABELS)
    carried = read_meta(exported).internal_test
    assert carried.split == "test" and (carried.n, carried.patients) == (m["n"], m["patients"])
    for label in LABELS:
        assert carried.labels[label]["auroc"] == m["labels"][label]["auroc"]
        assert carried.labels[label]["auroc_ci"] == m["labels"][label]["auroc_ci"]
    assert read_meta(exported).run_folder == os.path.abspath(run)
    # A healthy run: it learns what it is shown (test macro AUROC well above chance) and its train and val
    # AUROCs climb together, so the overfitting flag stays quiet.
    assert m["macro"]["auroc"] > 0.8, m["macro"]  # measured 0.92-0.93 on this machine
    found = m["overfitting"]
    assert found["note"] == "" and not found["flagged"] and found["remedies"] == [], found  # gaps -0.01 to 0.05
    assert "No sign of overfitting" in page


def _check_saliency_examples(m: dict, preds: dict) -> None:
    """metrics.json's saliency lists are the top records by probability, computed here with numpy."""
    n = m["saliency"]["examples_per_category"]
    assert n == 2
    for k, label in enumerate(preds["label_names"]):
        entry, t = m["saliency"]["labels"][label], m["labels"][label]["threshold"]
        p, y = preds["probs"][:, k], preds["labels"][:, k]
        want = {"true positive": np.argsort(-np.where((y == 1) & (p >= t), p, -1))[:n],
                "false positive": np.argsort(-np.where((y == 0) & (p >= t), p, -1))[:n],
                "false negative": np.argsort(np.where((y == 1) & (p < t), p, 2))[:n]}
        counts = {"true positive": ((y == 1) & (p >= t)).sum(), "false positive": ((y == 0) & (p >= t)).sum(),
                  "false negative": ((y == 1) & (p < t)).sum()}
        for category, order in want.items():
            got = [e["probability"] for e in entry[category]]
            assert len(got) == min(n, counts[category])
            np.testing.assert_allclose(got, p[order[:len(got)]], rtol=1e-6)


def test_external_validation_beside_the_internal_test_set(exported, other_site, internal_report, tmp_path):
    from sklearn.metrics import roc_auc_score

    from medtl.evaluate.report import read_predictions

    out = tmp_path / "external"
    r = run_cli("evaluate", "--model", exported, "--records", other_site["records"], "--label-map",
                other_site["map"], "--out", out, "--set", "evaluate.saliency=true")
    assert r.returncode == 0, r.stderr[-3000:]
    m, internal = _metrics(out), _metrics(internal_report)
    ext = m["external"]
    assert ext["pairs"] == [["Disk", "Solid Disk"]]
    assert ext["unmapped_model_labels"] == ["Ring"] and ext["unmapped_records_labels"] == ["Fracture"]
    assert list(m["labels"]) == ["Disk"] and ext["internal_source"] == "the export's metadata"
    assert ext["internal"]["n"] == internal["n"]
    (row,) = ext["rows"]
    assert row["internal"]["auroc"] == internal["labels"]["Disk"]["auroc"]
    assert row["external"]["auroc_ci"] == m["labels"]["Disk"]["auroc_ci"]
    # The external AUROC, from the truth this test drew and the records' salted keys.
    preds = read_predictions(out)
    salt = deid.load_salt()  # $MEDTL_ID_SALT, as bytes
    truth = {deid.salted_hash(salt, s["file"]): s["Disk"] for s in other_site["rows"]}
    y = np.array([truth[k] for k in preds["key"]])
    assert m["labels"]["Disk"]["auroc"] == pytest.approx(roc_auc_score(y, preds["probs"][:, 0]))
    _check_saliency_examples(m, preds)
    page = open(out / "report.html").read()
    for text in ("External validation", "Solid Disk", "Model labels not scored: Ring", "Records labels not used: "
                 "Fracture", "the export&#x27;s metadata", "This report shows image pixels"):
        assert text in page, text

    probe = chromium_probe(out / "report.html", tmp_path)
    assert probe["errors"] == [] and probe["images"] == probe["decoded"] == 6 + 1
    assert probe["sections"]["external"] > 100 and probe["sections"]["saliency"] > 200


def test_label_map_errors_one_line_each(exported, other_site, tmp_path):
    def evaluate_with(text):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        return run_cli("evaluate", "--model", exported, "--records", other_site["records"], "--label-map", path,
                       "--out", tmp_path / "x"), str(path)

    r, path = evaluate_with("Disc: Solid Disk\n")
    assert_user_error(r, f"label map {path}: key 'Disc' is not a label of model", "'Disk', 'Ring'", exit_code=2)
    r, path = evaluate_with("Disk: Solid disk\n")
    assert_user_error(r, "'Disk' maps to 'Solid disk', which is not a label of records", "'Solid Disk', 'Fracture'")
    r, path = evaluate_with("Disk: Fracture\nRing: Fracture\n")
    assert_user_error(r, f"label map {path} maps two model labels to records label 'Fracture'")
    r, path = evaluate_with("Disk: null\n")
    assert_user_error(r, "share no label with model", f"under label map {path}")
    assert not os.path.exists(tmp_path / "x")
