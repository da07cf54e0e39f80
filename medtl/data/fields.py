"""Non-identifying study fields that ingest keeps on request (--keep-fields), for subgroup reports.

Each field's stored value is coarse by construction: a coded value, an age band, or a salted id.
  sex            M, F or O (DICOM PatientSex; the tables' Patient Gender / Sex); anything else: unknown
  age_band       one of AGE_BANDS, from DICOM PatientAge, else PatientBirthDate and StudyDate (or the
                 tables' Patient Age / Age), computed here; no date and no exact age is ever stored
  view_position  DICOM ViewPosition (PA, AP, LL, ...); the tables' View Position or AP/PA (CheXpert's
                 laterals: LATERAL)
  modality       DICOM Modality (DX, CR, CT, ...)
  manufacturer   DICOM Manufacturer (General Equipment module: the vendor, not the patient)
  site           the ingest's --site label, else a salted id of DICOM InstitutionName (site-<hex>):
                 an institution is no patient identifier, but with a date and an age band it narrows who
                 a patient is, and a site's name can itself be sensitive (a specialised clinic)
"" means unknown. Plain Python (config.py validates evaluate.subgroups against SAFE_FIELDS).
"""
from __future__ import annotations

import datetime
import re

SAFE_FIELDS = ("sex", "age_band", "view_position", "modality", "manufacturer", "site")
# (lowest age in years, label): bands wide enough that no band singles out a patient; 80+ top-codes the
# oldest (HIPAA Safe Harbor aggregates ages over 89; this is coarser).
AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-59"), (60, "60-79"), (80, "80+"))
SITE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_MAX_TEXT = 64  # DICOM LO is at most 64 characters
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_DICOM_AGE = re.compile(r"^(\d{1,3})([DWMY]?)$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25, "": 365.25}


def age_band(years: float | None) -> str:
    """The band of an age in years ("" when unknown or not a plausible age)."""
    if years is None or not 0 <= years < 130:
        return ""
    return [label for low, label in AGE_BANDS if years >= low][-1]


def age_years(text: str) -> float | None:
    """An age as a table or DICOM PatientAge gives it ("58", "058Y", "011M", "003W"), in years."""
    match = _DICOM_AGE.match((text or "").strip().upper())
    if not match:
        try:  # tables may hold "58.0"
            return float(text)
        except (TypeError, ValueError):
            return None
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime((text or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def years_between(birth: str, study: str) -> float | None:
    """Full years from a DICOM birth date to a study date (YYYYMMDD each), None when either is unusable."""
    born, seen = _date(birth), _date(study)
    if born is None or seen is None or seen < born:
        return None
    return seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def sex(text: str) -> str:
    return _SEX.get((text or "").strip().upper(), "")


def coded(text: str) -> str:
    """A coded or short text value (view position, modality, manufacturer), upper-cased and bounded."""
    return re.sub(r"\s+", " ", (text or "").strip().upper())[:_MAX_TEXT]


def site_id(salt: bytes, institution: str) -> str:
    """site-<hex>: the institution's salted id (the same salt names one institution the same way)."""
    from medtl.data.deid import salted_hash

    name = coded(institution)
    return f"site-{salted_hash(salt, 'institution:' + name, 10)}" if name else ""


def from_dicom(ds, names: tuple[str, ...], salt: bytes) -> dict[str, str]:
    """The asked-for fields of a pydicom Dataset (header only)."""
    def tag(keyword: str) -> str:
        return str(ds.get(keyword, "") or "")

    out = {}
    for name in names:
        if name == "sex":
            out[name] = sex(tag("PatientSex"))
        elif name == "age_band":
            years = age_years(tag("PatientAge")) if tag("PatientAge").strip() else None
            out[name] = age_band(years if years is not None else years_between(tag("PatientBirthDate"),
                                                                               tag("StudyDate")))
        elif name == "site":
            out[name] = site_id(salt, tag("InstitutionName"))
        else:
            out[name] = coded(tag({"view_position": "ViewPosition", "modality": "Modality",
                                   "manufacturer": "Manufacturer"}[name]))
    return out


def from_table(sex_text: str, age_text: str, view_text: str) -> dict[str, str]:
    """The fields a labels table row can give (ChestX-ray14's and CheXpert's columns)."""
    return {"sex": sex(sex_text), "age_band": age_band(age_years(age_text)), "view_position": coded(view_text)}
