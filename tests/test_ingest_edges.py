"""Ingest edge cases (issue 17): duplicate image rows, a label spelt two ways, an empty val split.

Each is one `medtl: error:` line naming the labels file or the split and the fix, identifying rows by
their number (row 1: the header), never by an image file name or a patient ID. (A finalize killed
midway: tests/reliability/test_ingest_faults.py.)
"""
import csv
import os

from conftest import JOBS, assert_user_error, ingest_args, run_cli


def _table(studies) -> tuple[list[str], list[dict]]:
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _write(path, columns, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _ingest(studies, labels, out, *extra):
    return run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", labels, "--out", out,
                   "--image-size", 32, *extra)


def _assert_no_file_names(line: str, rows: list[dict]) -> None:
    """No image file name in the error line. (The synthetic patient IDs are small numbers, which a
    row number could match; the multihot cases below check their patient IDs.)"""
    for row in rows:
        assert row["Image Index"] not in line, line


def test_duplicate_image_rows_are_refused(studies, tmp_path):
    columns, rows = _table(studies)
    # The same image twice with different labels (row 6 repeated as row 242), and twice with equal ones.
    twice = dict(rows[4], **{"Finding Labels": "Mass"})
    labels = _write(tmp_path / "dup.csv", columns, rows + [twice, rows[9]])
    out = tmp_path / "records"
    r = _ingest(studies, labels, out)
    line = assert_user_error(r, "dup.csv", "same image on rows 6, 242", "1 more image(s)",
                             "list each image once")
    _assert_no_file_names(line, rows)
    assert not out.exists() or not (out / "manifest.json").exists()
    # The multihot reader refuses them too, even with equal labels.
    multihot = _write(tmp_path / "dup_multihot.csv", ["image", "patient", "Mass"],
                      [{"image": "a.png", "patient": "p1", "Mass": "1"},
                       {"image": "b.png", "patient": "p2", "Mass": "0"},
                       {"image": "./a.png", "patient": "p1", "Mass": "1"}])
    r = _ingest(studies, multihot, tmp_path / "r2", "--format", "multihot")
    line = assert_user_error(r, "dup_multihot.csv", "same image on rows 2, 4", "list each image once")
    assert "a.png" not in line and "p1" not in line


def test_label_spelt_two_ways_is_refused(studies, tmp_path):
    columns, rows = _table(studies)
    first = next(i for i, row in enumerate(rows) if "Effusion" in row["Finding Labels"].split("|"))
    later = next(i for i, row in enumerate(rows) if i > first and "Effusion" in row["Finding Labels"].split("|"))
    changed = [dict(row) for row in rows]
    changed[later]["Finding Labels"] = changed[later]["Finding Labels"].replace("Effusion", "effusion")
    labels = _write(tmp_path / "case.csv", columns, changed)
    line = assert_user_error(_ingest(studies, labels, tmp_path / "r1"), "case.csv",
                             f"'Effusion' (first on row {first + 2}) and 'effusion' (first on row {later + 2})",
                             "use one spelling")
    _assert_no_file_names(line, rows)
    # 'No Finding' is a known label too.
    changed = [dict(row) for row in rows]
    changed[later]["Finding Labels"] = "No_Finding"
    assert_user_error(_ingest(studies, _write(tmp_path / "nf.csv", columns, changed), tmp_path / "r2"),
                      "nf.csv", "'No Finding' (the no-finding marker) and 'No_Finding'")
    # Against --label-names: the file's spelling differs from the one asked for.
    assert_user_error(_ingest(studies, os.path.join(studies, "labels.csv"), tmp_path / "r3",
                                     "--label-names", "Cardiomegaly,effusion"),
                      "'effusion' (--label-names) and 'Effusion' (first on row", "use one spelling")
    # A multihot header with one label in two columns.
    multihot = _write(tmp_path / "cols.csv", ["image", "patient", "Pleural Effusion", "pleural_effusion"],
                      [{"image": "a.png", "patient": "p1", "Pleural Effusion": "1", "pleural_effusion": "0"}])
    line = assert_user_error(_ingest(studies, multihot, tmp_path / "r4", "--format", "multihot"), "cols.csv",
                             "'Pleural Effusion' (column 3) and 'pleural_effusion' (column 4)", "use one spelling")
    assert "a.png" not in line and "p1" not in line
    # --label-names against a multihot header: the near miss is named.
    multihot = _write(tmp_path / "near.csv", ["image", "patient", "Pleural Effusion"],
                      [{"image": "a.png", "patient": "p1", "Pleural Effusion": "1"}])
    assert_user_error(_ingest(studies, multihot, tmp_path / "r5", "--format", "multihot", "--label-names",
                              "Pleural_Effusion"),
                      "--label-names Pleural_Effusion not in", "differs from 'Pleural Effusion' only by case")


def test_empty_val_split_warns_at_ingest_and_stops_train_at_start(studies, tmp_path):
    _, rows = _table(studies)
    patients = sorted({row["Patient ID"] for row in rows}, key=int)
    with open(tmp_path / "splits.csv", "w", newline="") as fh:  # no patient in val
        writer = csv.writer(fh)
        writer.writerow(["patient", "split"])
        writer.writerows([p, "test" if i % 4 == 0 else "train"] for i, p in enumerate(patients))
    records = tmp_path / "records"
    r = run_cli("ingest", *ingest_args(studies, records, "--split-file", tmp_path / "splits.csv"))
    assert r.returncode == 0, r.stderr
    assert "warning: the val split of" in r.stderr and "give some patients the split 'val' in --split-file" in r.stderr
    assert "warning: the test split" not in r.stderr
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={records}")
    assert_user_error(r, "the val split of", str(records), "is empty (0 records)", "more patients",
                      "larger --val-fraction")
    assert not (tmp_path / "run").exists()
    # Asking for no val split is not warned about (records only to evaluate on, say); train still refuses.
    r = run_cli("ingest", *ingest_args(studies, tmp_path / "r0", "--val-fraction", 0))
    assert r.returncode == 0, r.stderr
    assert "warning: the val split" not in r.stderr
