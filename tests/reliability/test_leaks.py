"""Planted identifiers never reach a shared artefact, and the input folder is never written (checks 7, 13)."""
import os
import stat

import pydicom
import pytest

from conftest import assert_user_error
from medtl.data.records import ALLOWED_FEATURES
from reliability.helpers import TINY, blobs_under, env, find_leaks, report, run_cli, tree_digest

pytestmark = pytest.mark.slow


def _planted(images):
    """Every identifying value in the DICOM headers: name, ID (MRN), birth date, accession number, a private
    tag, the institution, and the UIDs (the CSV's patient IDs are the same MRNs)."""
    values = set()
    for name in os.listdir(images):
        ds = pydicom.dcmread(os.path.join(images, name))
        values.update({str(ds.PatientName), str(ds.PatientName.family_name), str(ds.PatientID),
                       ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName,
                       ds[0x0011, 0x1001].value, ds.StudyInstanceUID, ds.SOPInstanceUID})
    return {v for v in values if v}


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


def test_no_identifier_reaches_any_artefact_and_input_stays_untouched(dicom_studies, tmp_path):
    import shutil

    studies = tmp_path / "studies"
    shutil.copytree(dicom_studies, studies)
    images = studies / "images"
    planted = _planted(images)
    assert len(planted) > 100
    # One damaged study: quarantined, and its identifiers must not leak through the quarantine file.
    victim = sorted(os.listdir(images))[0]
    data = (images / victim).read_bytes()
    (images / victim).write_bytes(data[: len(data) - 2000])
    salt = "planted-salt-value-0123456789"
    enforced = _read_only(studies)
    before = tree_digest(studies)
    debug = {"MEDTL_ID_SALT": salt, "MEDTL_LOG_LEVEL": "debug", "TF_CPP_MIN_LOG_LEVEL": "0"}

    # Writing into the input folder is refused, whatever the file permissions say.
    inside = run_cli("ingest", "--images", images, "--labels", studies / "labels.csv", "--out", images / "records",
                     "--image-size", 32, env=env(**debug))
    assert_user_error(inside, "is inside the input folder", "read-only")
    out = tmp_path / "records"
    logs = {}
    r = run_cli("ingest", "--images", images, "--labels", studies / "labels.csv", "--out", out, "--image-size", 32,
                "--keep-fields", "view_position,modality,sex", "--max-bad-fraction", 0.1, env=env(**debug))
    logs["ingest"] = r
    assert r.returncode == 0, r.stderr
    assert "medtl: debug:" in r.stderr
    assert f"{victim},truncated_pixel_data" in (out / "quarantine.csv").read_text()
    run = tmp_path / "run"
    assert_user_error(run_cli("train", "--config", TINY, "--workdir", out / "run", "--set", f"data.records={out}",
                              env=env(**debug)), "inside the records folder")
    r = run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={out}", "--set",
                "data.image_size=32", "--set", "train.batch_size=4", "--set", "phases.0.epochs=1", "--set",
                "phases.1.epochs=1", env=env(**debug))
    logs["train"] = r
    assert r.returncode == 0, r.stderr[-3000:]
    reports = tmp_path / "report"
    r = run_cli("evaluate", "--workdir", run, "--split", "train", "--out", reports, "--set", "evaluate.bootstrap=0",
                env=env(**debug))
    logs["evaluate"] = r
    assert r.returncode == 0, r.stderr[-3000:]
    model = tmp_path / "model"
    r = run_cli("export", "--workdir", run, "--out", model, env=env(**debug))
    logs["export"] = r
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(studies) == before, "the input folder changed"

    blobs = {f"{name} log": (p.stdout + p.stderr).encode() for name, p in logs.items()}
    blobs.update(blobs_under(out, run, reports, model))
    assert any(k.endswith(".weights.h5") for k in blobs) and any("saved_model.pb" in k for k in blobs)
    assert any("!" in k for k in blobs), "a container (predictions.npz) was opened"
    searched = sum(len(b) for b in blobs.values())
    assert searched > 1_000_000
    leaks = find_leaks(sorted(planted) + [salt], blobs)
    assert not leaks, leaks

    from medtl.tf import tf

    shard = next(f for f in os.listdir(out) if f.startswith("train-"))
    for record in tf.data.TFRecordDataset(str(out / shard)).take(3):  # records hold allow-listed features only
        assert set(tf.train.Example.FromString(record.numpy()).features.feature) <= set(ALLOWED_FEATURES)
    report("7. Identifier leak", f"{len(planted)} identifying values planted in 40 DICOM headers (name, ID, birth "
           "date, accession, private tag, institution, UIDs) + the salt; ingest, train, evaluate, export at debug "
           "log level", f"none found in {len(blobs)} files, container members and logs (shards, manifest, "
           "quarantine, checkpoints, reports, SavedModel)", identifiers_planted=len(planted),
           bytes_searched=searched)
    how = ("chmod a-w enforced" if enforced else "running as root, so chmod a-w does not stop writes: proven by "
           "hashing the input tree before and after, and by the refusal")
    report("13. Read-only input", f"input tree chmod a-w ({how}); ingest + train + evaluate + export; "
           "ingest --out inside the input; train --workdir inside the records",
           f"all succeeded; the {len(before)} input files are byte-identical afterwards; both writes into inputs "
           "refused with one error line", input_files_hashed=len(before))
