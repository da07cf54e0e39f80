"""Procedural chest-X-ray-like studies with learnable findings, in the ChestX-ray14 layout.

Each finding is drawn as the structure a radiologist would look for (a round
opacity for a nodule, a basal fluid level for effusion, an enlarged heart
shadow for cardiomegaly, ...). Findings are sampled from a few latent disease
processes so they co-occur as in real data, with ChestX-ray14-like imbalance.
The same seed always gives the same bytes.
"""
from __future__ import annotations

import csv
import datetime
import os
import zlib
from dataclasses import dataclass

import numpy as np

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumothorax",
    "Edema",
)
NO_FINDING = "No Finding"

# ChestX-ray14's Data_Entry_2017.csv header, exactly: the bracketed names
# contain commas, so a CSV reader sees 12 columns, the last one empty.
CXR14_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "",
]


@dataclass(frozen=True)
class Patient:
    index: int
    age: int
    sex: str
    heart_scale: float      # persistent anatomy
    lung_scale: float
    chronic: frozenset      # findings present on every study of this patient


def _latent_findings(rng: np.random.Generator, chronic: frozenset) -> set[str]:
    """Sample one study's findings from latent processes, so they co-occur realistically."""
    found = set(chronic)
    heart_failure = rng.random() < 0.07
    infection = rng.random() < 0.16
    neoplasm = rng.random() < 0.10
    trauma = rng.random() < 0.04
    if heart_failure:
        found.add("Cardiomegaly")
        if rng.random() < 0.6:
            found.add("Effusion")
        if rng.random() < 0.5:
            found.add("Edema")
    if infection:
        found.add("Infiltration")
        if rng.random() < 0.25:
            found.add("Effusion")
        if rng.random() < 0.3:
            found.add("Atelectasis")
    if neoplasm:
        found.add("Mass" if rng.random() < 0.5 else "Nodule")
        if rng.random() < 0.25:
            found.add("Nodule")
        if rng.random() < 0.2:
            found.add("Effusion")
    if trauma:
        found.add("Pneumothorax")
    # Independent background rates (incidental findings).
    for name, rate in (("Atelectasis", 0.05), ("Effusion", 0.03), ("Nodule", 0.025),
                       ("Infiltration", 0.03), ("Pneumothorax", 0.01)):
        if rng.random() < rate:
            found.add(name)
    return found


def _make_patients(rng: np.random.Generator, n_images: int, first: int = 1) -> list[tuple[Patient, int]]:
    """Patients with 1-6 studies each (geometric), numbered from `first`, until n_images studies exist."""
    out: list[tuple[Patient, int]] = []
    index = first - 1
    while len(out) < n_images:
        index += 1
        chronic = set()
        if rng.random() < 0.04:
            chronic.add("Cardiomegaly")
        if rng.random() < 0.02:
            chronic.add("Nodule")
        patient = Patient(
            index=index,
            age=int(rng.integers(18, 90)),
            sex="M" if rng.random() < 0.56 else "F",
            heart_scale=float(rng.normal(1.0, 0.05)),
            lung_scale=float(rng.normal(1.0, 0.04)),
            chronic=frozenset(chronic),
        )
        n_studies = min(int(rng.geometric(0.45)), 6)
        for follow_up in range(n_studies):
            out.append((patient, follow_up))
    return out[:n_images]


def _ellipse(xx, yy, cx, cy, rx, ry, angle=0.0):
    """Normalised ellipse distance (<1 inside)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return np.sqrt(u * u + v * v)


def _soft(d, edge=0.08):
    """1 inside, 0 outside, with a soft edge of relative width `edge`."""
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def _smooth_noise(rng, size, scale):
    """Low-frequency noise: a coarse random grid, bicubically upsampled."""
    import cv2

    coarse = rng.normal(0, 1, (scale, scale)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def render(rng: np.random.Generator, patient: Patient, findings: set[str], size: int) -> np.ndarray:
    """One frontal (PA) radiograph-like image, float32 in [0, 1], shape (size, size)."""
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = np.meshgrid(lin, lin)
    # Per-study pose jitter.
    ox, oy = rng.normal(0, 0.03, 2)
    xx = xx - ox
    yy = yy - oy
    img = np.full((size, size), 0.04, np.float32)

    thorax = _soft(_ellipse(xx, yy, 0.0, 0.05, 0.86, 1.0), 0.05)
    img += 0.38 * thorax

    ls = patient.lung_scale * (0.88 if "Atelectasis" in findings else 1.0)
    lung_r = _soft(_ellipse(xx, yy, -0.38, -0.08, 0.29 * patient.lung_scale, 0.62 * patient.lung_scale), 0.06)
    lung_l = _soft(_ellipse(xx, yy, 0.38, -0.08 + (1 - ls) * 0.3, 0.29 * patient.lung_scale, 0.62 * ls), 0.06)
    lungs = np.maximum(lung_r, lung_l)
    img -= 0.26 * lungs

    # Ribs: faint arcs over the lungs (missing where a pneumothorax has collapsed the lung).
    ribs = 0.5 + 0.5 * np.sin(18.0 * (yy + 0.18 * xx * xx) + rng.uniform(0, np.pi))
    rib_mask = lungs.copy()

    # Spine / mediastinum.
    img += 0.30 * _soft(np.abs(xx) / 0.09, 0.3) * thorax

    # Heart: below-centre, towards the patient's left (image right).
    heart_w = 0.25 * patient.heart_scale * (1.45 if "Cardiomegaly" in findings else 1.0)
    heart = _soft(_ellipse(xx, yy, 0.10, 0.38, heart_w, 0.22 * patient.heart_scale, -0.3), 0.1)
    img += 0.30 * heart

    # Diaphragm / abdomen below the lungs.
    img += 0.32 * np.clip((yy - 0.62 - 0.08 * xx * xx) / 0.05, 0, 1) * thorax

    if "Effusion" in findings:
        side = rng.choice([-1, 1]) if rng.random() < 0.7 else 0
        level = rng.uniform(0.18, 0.38)
        for sx in ([side] if side else [-1, 1]):
            lung = lung_r if sx < 0 else lung_l
            # Meniscus: fluid climbs the lateral wall.
            meniscus = level - 0.35 * np.clip(np.abs(xx) - 0.30, 0, None) * 3.0
            fluid = np.clip((yy - meniscus) / 0.04, 0, 1) * lung
            img += 0.30 * fluid
            rib_mask = rib_mask * (1 - fluid)

    if "Pneumothorax" in findings:
        sx = rng.choice([-1, 1])
        lung = lung_r if sx < 0 else lung_l
        # Apical air with no lung markings, bounded by a thin pleural line.
        edge = _ellipse(xx, yy, 0.38 * sx, -0.30, 0.25, 0.38)
        air = np.clip((edge - 0.72) / 0.06, 0, 1) * lung * (yy < 0.1)
        img -= 0.10 * air
        line = np.exp(-((edge - 0.72) / 0.02) ** 2) * lung * (yy < 0.05)
        img += 0.20 * line
        rib_mask = rib_mask * (1 - air)

    img += 0.05 * ribs * rib_mask

    if "Infiltration" in findings:
        sx = rng.choice([-1, 1])
        lung = lung_r if sx < 0 else lung_l
        cy = rng.uniform(-0.35, 0.25)
        patch = _soft(_ellipse(xx, yy, 0.38 * sx, cy, 0.22, 0.26), 0.6)
        texture = np.clip(_smooth_noise(rng, size, 12), 0, None)
        img += 0.26 * patch * lung * (0.5 + texture)

    if "Edema" in findings:
        # Bilateral perihilar haze (bat-wing) with fine interstitial lines.
        haze = _soft(_ellipse(np.abs(xx), yy, 0.22, -0.02, 0.30, 0.34), 0.8)
        lines = 0.5 + 0.5 * np.sin(40.0 * xx)
        img += (0.12 + 0.06 * lines) * haze * lungs

    if "Atelectasis" in findings:
        # A plate-like linear band at the lung base.
        sx = rng.choice([-1, 1])
        lung = lung_r if sx < 0 else lung_l
        y0 = rng.uniform(0.12, 0.32)
        band = np.exp(-(((yy - y0) - 0.15 * (xx - 0.38 * sx)) / 0.030) ** 2)
        img += 0.28 * band * lung

    for name, count, radius, contrast in (("Nodule", rng.integers(1, 3), (0.05, 0.075), 0.40),
                                          ("Mass", 1, (0.12, 0.17), 0.36)):
        if name not in findings:
            continue
        for _ in range(int(count)):
            sx = rng.choice([-1, 1])
            cx = 0.38 * sx + rng.uniform(-0.14, 0.14)
            cy = rng.uniform(-0.45, 0.30)
            r = rng.uniform(*radius)
            lobes = 1.0 + (0.12 * np.sin(5 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6))
                           if name == "Mass" else 0.0)
            blob = _soft(_ellipse(xx, yy, cx, cy, r * lobes, r * lobes), 0.35)
            img += contrast * blob

    # Acquisition: exposure, soft low-frequency gradient, quantum noise.
    img *= rng.uniform(0.85, 1.15)
    img += 0.04 * _smooth_noise(rng, size, 4)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _fake_identity(rng: np.random.Generator, patient: Patient) -> dict[str, str]:
    """Planted, fake patient identifiers for DICOM output (to exercise de-identification)."""
    first = ("ALICE", "BRUNO", "CHIARA", "DMITRI", "ELIF", "FARID", "GRETA", "HIRO")
    last = ("SYNTHWELL", "FAKESON", "NOTREAL", "PSEUDOVA", "MADEUP")
    birth = datetime.date(2026 - patient.age, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    return {
        "PatientName": f"{last[patient.index % len(last)]}^{first[patient.index % len(first)]}",
        "PatientID": f"MRN{patient.index:07d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
    }


def write_dicom(path: str, pixels: np.ndarray, identity: dict[str, str], accession: str,
                patient: Patient, uid_seed: int) -> None:
    """A 16-bit MONOCHROME2 DX file (explicit VR little endian) carrying fake identifiers."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    sop_instance = generate_uid(entropy_srcs=[str(uid_seed), "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["medtl"])
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(uid_seed), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(uid_seed), "series"])
    ds.Modality = "DX"
    for key, value in identity.items():
        setattr(ds, key, value)
    ds.PatientSex = patient.sex
    ds.AccessionNumber = accession
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.Manufacturer = "MEDTL SYNTH"  # the equipment's vendor: no patient identifier
    ds.StudyDate = "20240101"
    ds.ViewPosition = "PA"
    # A private tag a vendor might use to carry the MRN again.
    block = ds.private_block(0x0011, "MEDTL SYNTH", create=True)
    block.add_new(0x01, "LO", f"PRIVATE-{identity['PatientID']}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = np.round(pixels * 4095).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_png(path: str, pixels: np.ndarray) -> None:
    """8-bit grayscale PNG (as ChestX-ray14 ships), written without extra dependencies."""
    import cv2

    ok = cv2.imwrite(path, np.round(pixels * 255).astype(np.uint8))
    if not ok:
        raise OSError(f"could not write {path}")


def synthesize(out: str, n: int, seed: int = 0, size: int = 256, dicom: bool = False,
               progress=None, first_patient: int = 1) -> dict:
    """Write `n` studies to `out/images/` and `out/labels.csv`, patients numbered from `first_patient`.
    Returns a summary."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if first_patient < 1:
        raise ValueError("first_patient must be >= 1")
    images_dir = os.path.join(out, "images")
    os.makedirs(images_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    studies = _make_patients(rng, n, first_patient)
    counts = {name: 0 for name in FINDINGS}
    rows = []
    for i, (patient, follow_up) in enumerate(studies):
        # Each study gets its own stream, so a study's pixels do not depend on earlier ones.
        study_rng = np.random.default_rng([seed, patient.index, follow_up])
        findings = _latent_findings(study_rng, patient.chronic)
        pixels = render(study_rng, patient, findings, size)
        if dicom:
            name = f"{patient.index:08d}_{follow_up:03d}.dcm"
            identity = _fake_identity(study_rng, patient)
            accession = f"ACC{zlib.crc32(name.encode()):010d}"
            write_dicom(os.path.join(images_dir, name), pixels, identity, accession, patient,
                        uid_seed=seed * 1_000_003 + i)
            patient_id = identity["PatientID"]
        else:
            name = f"{patient.index:08d}_{follow_up:03d}.png"
            write_png(os.path.join(images_dir, name), pixels)
            patient_id = str(patient.index)
        labels = [f for f in FINDINGS if f in findings]
        for f in labels:
            counts[f] += 1
        rows.append([name, "|".join(labels) or NO_FINDING, follow_up, patient_id,
                     patient.age, patient.sex, "PA", size, size, 0.143, 0.143, ""])
        if progress:
            progress(1)
    with open(os.path.join(out, "labels.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CXR14_HEADER)
        writer.writerows(rows)
    n_patients = len({r[3] for r in rows})
    return {"images": len(rows), "patients": n_patients,
            "prevalence": {k: v / len(rows) for k, v in counts.items()}}
