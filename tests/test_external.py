"""Label maps for external validation (medtl.evaluate.external) and where an export's internal test figures
come from. The CLI path (errors as one line, a report beside the internal test set) is in
test_clinical_cli.py."""
import dataclasses

import numpy as np
import pytest

from medtl.errors import MedtlError
from medtl.evaluate.external import build_mapping, exact_mapping

MODEL = ("Atelectasis", "Cardiomegaly", "Effusion", "Nodule", "Mass")
RECORDS = ("Pleural Effusion", "Cardiomegaly", "Lung Lesion", "Atelectasis", "Fracture")


def _map(tmp_path, text: str, model=MODEL, records=RECORDS):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return build_mapping(str(path), model, records, "EXPORT", "OTHER")


def test_map_entries_names_and_null(tmp_path):
    m = _map(tmp_path, "Effusion: Pleural Effusion\nMass: Lung Lesion\nAtelectasis: null\n")
    # Model order; Cardiomegaly by name; Atelectasis left out although the records have it.
    assert m.pairs == (("Cardiomegaly", "Cardiomegaly"), ("Effusion", "Pleural Effusion"), ("Mass", "Lung Lesion"))
    assert m.unmapped_model == ("Atelectasis", "Nodule")
    assert m.unmapped_records == ("Atelectasis", "Fracture")
    # Model probabilities (batch, 5) -> records columns: column r holds the model column scored against it.
    probs = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    padded = np.concatenate([probs, np.zeros((1, 1))], axis=1)
    in_records = padded[:, m.gather_index()]
    np.testing.assert_array_equal(in_records, [[0.3, 0.2, 0.5, 0.0, 0.0]])
    labels = np.array([[1, 0, 1, 0, 1]], np.float32)  # records order
    picked = m.select({"probs": in_records, "labels": labels, "mask": np.ones_like(labels), "key": np.array(["k"])})
    np.testing.assert_array_equal(picked["probs"], [[0.2, 0.3, 0.5]])  # Cardiomegaly, Effusion, Mass
    np.testing.assert_array_equal(picked["labels"], [[0, 1, 1]])
    assert picked["key"].tolist() == ["k"]
    assert m.train_prevalence({"Pleural Effusion": 0.3, "Cardiomegaly": 0.1, "Lung Lesion": 0.05}) == {
        "Cardiomegaly": 0.1, "Effusion": 0.3, "Mass": 0.05}


@pytest.mark.parametrize("text, fragments", [
    ("Efusion: Pleural Effusion\n", ["key 'Efusion' is not a label of model EXPORT", "'Effusion'", "'Nodule'"]),
    ("Effusion: Pleural Efusion\n", ["'Effusion' maps to 'Pleural Efusion', which is not a label of records OTHER",
                                     "'Pleural Effusion'", "'Fracture'"]),
    ("Nodule: Lung Lesion\nMass: Lung Lesion\n", ["two model labels to records label 'Lung Lesion'",
                                                  "'Nodule' (in the map) and 'Mass' (in the map)"]),
    ("Effusion: Cardiomegaly\n", ["two model labels to records label 'Cardiomegaly'",
                                  "'Cardiomegaly' (same name, not in the map) and 'Effusion' (in the map)"]),
    ("- Effusion\n", ["must be a mapping", "got a list"]),
    ("Effusion: [a, b]\n", ["entry 'Effusion'", "quote names"]),
    ("Effusion: {\n", ["is not readable YAML"]),
])
def test_map_errors_name_the_file_the_entry_and_the_valid_names(tmp_path, text, fragments):
    with pytest.raises(MedtlError) as info:
        _map(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "map.yaml") in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_no_shared_label_and_a_missing_file(tmp_path):
    with pytest.raises(MedtlError, match="share no label with model EXPORT under label map"):
        _map(tmp_path, "Cardiomegaly: null\nAtelectasis: null\n")
    with pytest.raises(MedtlError, match="label map .*nowhere.yaml does not exist"):
        build_mapping(str(tmp_path / "nowhere.yaml"), MODEL, RECORDS, "EXPORT", "OTHER")
    assert _map(tmp_path, "").pairs == (("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"))
    with pytest.raises(MedtlError, match="or map the labels with --label-map"):
        exact_mapping(MODEL, RECORDS, "EXPORT", "OTHER")
    assert exact_mapping(MODEL, MODEL, "EXPORT", "OTHER").gather_index() == [0, 1, 2, 3, 4]


def test_internal_test_metrics_from_the_export_then_its_run_folder(tmp_path):
    from medtl.serve.evaluate import internal_test_metrics
    from medtl.serve.meta import ExportMeta
    from medtl.train.rundir import RunDir, SplitMetrics, Thresholds

    thresholds = Thresholds(policy="youden", target=0.9, tta="none", tuned_on="val", val_records=10,
                            labels={"A": {"threshold": 0.5, "note": ""}}, checkpoint_sha256="abc")
    test = SplitMetrics(split="test", checkpoint_sha256="abc", tta="none", n=20, patients=10, confidence=0.95,
                        bootstrap=200, labels={"A": {"auroc": 0.8}}, macro={"auroc": 0.8})
    meta = ExportMeta(label_names=("A",), thresholds=thresholds, image_size=64, channels=3, stored_image_size=64,
                      bit_depth=8, aspect="pad", frame="middle", backbone="B", data_manifest_sha256="", config={},
                      run_folder=str(tmp_path / "run"), internal_test=test)
    assert internal_test_metrics(meta) == (test, "the export's metadata")
    assert ExportMeta.from_dict(meta.to_dict()).internal_test == test  # the JSON round trip keeps it

    older = dataclasses.replace(meta, internal_test=None)
    found, why = internal_test_metrics(older)
    assert found is None and "not available" in why and "medtl evaluate --workdir RUN --split test" in why
    run = RunDir(str(tmp_path / "run"))
    run.write_split_metrics(dataclasses.replace(test, checkpoint_sha256="other checkpoint"))
    assert internal_test_metrics(older)[0] is None  # another checkpoint's figures do not count
    run.write_split_metrics(test)
    assert internal_test_metrics(older) == (test, f"the export's run folder {tmp_path / 'run'}")
    assert internal_test_metrics(dataclasses.replace(older, run_folder=""))[0] is None
