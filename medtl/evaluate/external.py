"""External validation: an exported model scored on another site's records, label by label, beside its
internal test result.

A label map (`medtl evaluate --model EXPORT --records OTHER --label-map MAP.yaml`) is a YAML mapping
from model label to records label:

    Effusion: Pleural Effusion   # the model's Effusion is scored against the records' Pleural Effusion
    Nodule: null                 # not evaluated

A model label the map leaves out is scored against the records label of the same name, when there is
one. No two model labels may share a records label. Without a map, the labels must match exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtl.errors import MedtlError


@dataclass(frozen=True)
class LabelMapping:
    """Which records column each evaluated model label is scored against."""

    # (model label, records label), in the model's label order.
    pairs: tuple[tuple[str, str], ...]
    model_labels: tuple[str, ...]  # all of the model's labels, in its output order
    records_labels: tuple[str, ...]  # all of the records' labels, in their label vectors' order
    map_file: str = ""  # "" when the labels matched exactly without a map

    @property
    def evaluated(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.pairs)

    @property
    def unmapped_model(self) -> tuple[str, ...]:
        used = set(self.evaluated)
        return tuple(m for m in self.model_labels if m not in used)

    @property
    def unmapped_records(self) -> tuple[str, ...]:
        used = {r for _, r in self.pairs}
        return tuple(r for r in self.records_labels if r not in used)

    @property
    def records_columns(self) -> list[int]:
        return [self.records_labels.index(r) for _, r in self.pairs]

    def is_identity(self) -> bool:
        """Every label scored against the records label of the same name, in the same order."""
        return self.model_labels == self.records_labels and all(m == r for m, r in self.pairs)

    def gather_index(self) -> list[int]:
        """Per records column, the model output column scored against it (len(model_labels): none)."""
        by_records = {r: self.model_labels.index(m) for m, r in self.pairs}
        return [by_records.get(r, len(self.model_labels)) for r in self.records_labels]

    def select(self, preds: dict) -> dict:
        """Prediction arrays in records columns (see gather_index) -> the evaluated labels' columns only."""
        cols = self.records_columns
        return {k: (v[:, cols] if k in ("probs", "labels", "mask") else v) for k, v in preds.items()}

    def train_prevalence(self, records_prevalence: dict) -> dict:
        """The records' per-label prevalence (by records label) under the model's label names."""
        return {m: records_prevalence.get(r) for m, r in self.pairs}

    def to_dict(self) -> dict:
        return {"label_map": self.map_file or None, "pairs": [list(p) for p in self.pairs],
                "unmapped_model_labels": list(self.unmapped_model),
                "unmapped_records_labels": list(self.unmapped_records)}


def exact_mapping(model_labels, records_labels, model_dir: str, records: str) -> LabelMapping:
    """Without a label map: the records must have the model's labels, in its order."""
    if list(records_labels) != list(model_labels):
        raise MedtlError(f"model {model_dir} was exported with labels {list(model_labels)} but {records} has "
                         f"{list(records_labels)}; evaluate it on records ingested with the same labels, or map "
                         "the labels with --label-map MAP.yaml (model label: records label; docs/evaluation.md)")
    return LabelMapping(tuple((n, n) for n in model_labels), tuple(model_labels), tuple(records_labels))


def _names(labels) -> str:
    return ", ".join(repr(n) for n in labels)


def read_label_map(path: str) -> dict[str, str | None]:
    """The map file as {model label: records label or None}, checked for shape (not yet for names)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise MedtlError(f"label map {path} does not exist; pass a YAML file of `model label: records label` "
                         "lines (e.g. jobs/label_maps/chexpert_to_cxr14.yaml)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MedtlError(f"label map {path} is not readable YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MedtlError(f"label map {path} must be a mapping of `model label: records label` lines, "
                         f"got a {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, str)):
            raise MedtlError(f"label map {path}: entry {key!r}: {value!r} must map a model label name to a "
                             "records label name (or null to leave it out); quote names YAML reads otherwise")
    return raw


def build_mapping(path: str, model_labels, records_labels, model_dir: str, records: str) -> LabelMapping:
    """The label map at `path` checked against both label lists; one error per problem, naming it."""
    entries = read_label_map(path)
    model_labels, records_labels = tuple(model_labels), tuple(records_labels)
    for key, value in entries.items():
        if key not in model_labels:
            raise MedtlError(f"label map {path}: key {key!r} is not a label of model {model_dir}; its labels: "
                             f"{_names(model_labels)}")
        if value is not None and value not in records_labels:
            raise MedtlError(f"label map {path}: {key!r} maps to {value!r}, which is not a label of records "
                             f"{records}; their labels: {_names(records_labels)}")
    pairs, source_of = [], {}
    for name in model_labels:
        target = entries[name] if name in entries else (name if name in records_labels else None)
        if target is None:
            continue
        how = "in the map" if name in entries else "same name, not in the map"
        if target in source_of:
            first, first_how = source_of[target]
            raise MedtlError(f"label map {path} maps two model labels to records label {target!r}: {first!r} "
                             f"({first_how}) and {name!r} ({how}); map each records label from one model label, "
                             "or map one of them to null")
        source_of[target] = (name, how)
        pairs.append((name, target))
    if not pairs:
        raise MedtlError(f"records {records} share no label with model {model_dir} under label map {path} "
                         f"(model: {_names(model_labels)}; records: {_names(records_labels)}); map at least one "
                         "model label to a records label")
    return LabelMapping(tuple(pairs), model_labels, records_labels, path)


# --------------------------------------------------------------------------- beside the internal test set


@dataclass(frozen=True)
class ExternalValidation:
    """An export on other records: the label mapping, and its internal test result when it is known."""

    mapping: LabelMapping
    internal: object = None  # medtl.train.rundir.SplitMetrics of the export's checkpoint, or None
    # Where `internal` came from, or why there is none.
    internal_source: str = ""


def external_summary(report: dict, external: ExternalValidation) -> dict:
    """metrics.json's 'external' entry: the mapping, the internal test set's figures, the comparison."""
    internal = external.internal
    about = None
    if internal is not None:
        about = {"split": internal.split, "n": internal.n, "patients": internal.patients,
                 "confidence": internal.confidence, "bootstrap": internal.bootstrap, "macro": internal.macro,
                 "evaluated_at": internal.evaluated_at}
    return {**external.mapping.to_dict(), "internal": about, "internal_source": external.internal_source,
            **comparison(report, external.mapping, internal)}


def comparison(report: dict, mapping: LabelMapping, internal) -> dict:
    """The external result per evaluated label beside the internal test set's (a SplitMetrics or None).

    'apart' marks labels whose two AUROC intervals do not overlap.
    """
    rows = []
    for model_label, records_label in mapping.pairs:
        ext = report["labels"][model_label]
        row = {"label": model_label, "records_label": records_label,
               "external": _figures(ext), "internal": _figures(internal.labels.get(model_label)) if internal else None}
        a, b = ext.get("auroc_ci"), (row["internal"] or {}).get("auroc_ci")
        row["apart"] = bool(a and b and (a[1] < b[0] or b[1] < a[0]))
        if ext.get("auroc") is not None and row["internal"] and row["internal"]["auroc"] is not None:
            row["auroc_difference"] = ext["auroc"] - row["internal"]["auroc"]
        else:
            row["auroc_difference"] = None
        rows.append(row)
    internal_macro = None
    if internal:
        values = [r["internal"]["auroc"] for r in rows if r["internal"] and r["internal"]["auroc"] is not None
                  and r["external"]["auroc"] is not None]
        internal_macro = float(np.mean(values)) if values else None
    return {"rows": rows, "internal_macro_auroc_same_labels": internal_macro}


def _figures(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row.get(k) for k in ("n", "positives", "prevalence", "auroc", "auroc_ci", "auprc", "auprc_ci")}
