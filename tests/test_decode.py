"""DICOM/PNG/JPEG decoding against pydicom's own output, over pydicom's bundled real files."""
import csv
import os
import shutil
import warnings

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

from medtl.data import decode
from medtl.data.deid import load_salt, salted_hash
from medtl.data.records import IMAGE, KEY, feature_spec
from medtl.tf import tf

from conftest import run_cli

# pydicom's wheel ships these files; get_testdata_files() would also try to download more.
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")

REASONS = {"not_dicom", "no_pixel_data", "truncated_pixel_data", "unsupported_transfer_syntax",
           "bad_image_header", "undecodable_pixels"}


def _reference(path, size):
    """pydicom's modality LUT (+ VOI LUT / window when present), normalised as documented, resized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        gray = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        lo, hi = gray.min(), gray.max()
        image = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    else:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        lo, hi = values.min(), values.max()
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds, prefer_lut=True)
            if "VOILUTSequence" in ds:
                lo, hi = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
            else:  # pydicom windows onto the stored range, rescaled
                bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
                lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
                slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
                lo, hi = lo * slope + intercept, hi * slope + intercept
        image = np.clip((values - lo) / (hi - lo), 0, 1) if hi != lo else np.zeros_like(values)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            image = 1 - image
    return decode.resize(image.astype(np.float32), size, "pad")


def test_pydicom_corpus_every_file_decoded_exactly_or_quarantined(tmp_path):
    """Ingest all of pydicom's bundled test files; each is a record equal to pydicom's output, or quarantined."""
    files = [os.path.join(PYDICOM_FILES, f) for f in os.listdir(PYDICOM_FILES)]
    files = [f for f in files if os.path.isfile(f)]
    assert len(files) > 60
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, f in enumerate(sorted(files)):
        name = f"{i:03d}_{os.path.basename(f)}"
        shutil.copy(f, images / name)
        rows.append({"image": name, "patient": f"p{i}", "finding": str(i % 2)})
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "patient", "finding"])
        writer.writeheader()
        writer.writerows(rows)
    r = run_cli("ingest", "--images", images, "--labels", tmp_path / "table.csv", "--format", "multihot",
                "--out", tmp_path / "records", "--image-size", 48, "--max-bad-fraction", 1.0,
                "--val-fraction", 0, "--test-fraction", 0, "--private-map", tmp_path / "map.csv")
    assert r.returncode == 0, r.stderr

    # quarantine.csv names studies by salted id only; the private map gives the file behind each.
    salt = load_salt()
    by_key = {salted_hash(salt, row["image"]): row["image"] for row in rows}
    with open(tmp_path / "map.csv", newline="") as fh:
        assert {row["study"]: row["path"] for row in csv.DictReader(fh)} == {
            k: str(images / name) for k, name in by_key.items()}
    text = (tmp_path / "records" / "quarantine.csv").read_text()
    with open(tmp_path / "records" / "quarantine.csv", newline="") as fh:
        quarantined = {by_key[row["study"]]: row for row in csv.DictReader(fh)}
    assert not [name for name in quarantined if os.path.splitext(name)[0] in text]
    decoded = {}
    spec = feature_spec(1)
    for shard in sorted((tmp_path / "records").glob("train-*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(shard)):
            ex = tf.io.parse_single_example(record, spec)
            png = tf.io.decode_png(ex[IMAGE], channels=1, dtype=tf.uint16).numpy()[..., 0]
            decoded[by_key[ex[KEY].numpy().decode()]] = png.astype(np.float64) / 65535
    assert set(decoded) | set(quarantined) == {row["image"] for row in rows}
    assert not set(decoded) & set(quarantined)
    assert len(decoded) >= 55, "most of pydicom's real files must decode"
    for name, row in quarantined.items():
        assert row["reason"] in REASONS, row
        assert row["message"], row
    for name, image in decoded.items():
        expected = _reference(str(images / name), 48)
        np.testing.assert_allclose(image, expected, atol=1.0 / 65535 + 1e-9, err_msg=name)
    # Specific outcomes that prove the coverage claims.
    reason = {n.split("_", 1)[1]: r["reason"] for n, r in quarantined.items()}
    for ok in ("CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
               "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "ExplVR_BigEnd.dcm"):
        assert any(n.endswith(ok) for n in decoded), ok
    # The reasons for MR_truncated.dcm, rtplan.dcm, README.txt and JPEG-lossy.dcm are checked in
    # tests/reliability/test_ingest_faults.py (the bad-DICOM corpus).
    assert {"MR_truncated.dcm", "rtplan.dcm", "README.txt", "JPEG-lossy.dcm"} <= set(reason)


def _write(path, stored, photometric, bits=16, signed=False, slope=1.0, intercept=0.0, window=None,
           big_endian=False, frames=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    if frames:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
        ds.VOILUTFunction = "LINEAR_EXACT"
    dtype = ("i" if signed else "u") + str(ds.BitsAllocated // 8)
    ds.PixelData = stored.astype((">" if big_endian else "<") + dtype).tobytes()
    ds.set_original_encoding(False, not big_endian)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_monochrome1_with_rescale_decodes_like_its_monochrome2_twin(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (40, 56)).astype(np.uint16)
    twin = 4095 - stored  # MONOCHROME1 stores the inverted values
    m2 = _write(tmp_path / "m2.dcm", stored, "MONOCHROME2", bits=12, slope=0.5, intercept=-100)
    m1 = _write(tmp_path / "m1.dcm", twin, "MONOCHROME1", bits=12, slope=0.5, intercept=-100)
    def stored_16bit(path):  # what ingest stores
        return np.round(decode.decode_file(str(path)) * 65535).astype(np.uint16)

    # Identical up to float rounding at a quantisation boundary: at most one 16-bit level apart.
    assert np.abs(stored_16bit(m1).astype(int) - stored_16bit(m2)).max() <= 1
    # With a (mirrored) LINEAR_EXACT window too.
    k = 0.5 * 4095 + 2 * -100  # modality value of the mirror axis, doubled
    m2w = _write(tmp_path / "m2w.dcm", stored, "MONOCHROME2", bits=12, slope=0.5, intercept=-100, window=(700, 800))
    m1w = _write(tmp_path / "m1w.dcm", twin, "MONOCHROME1", bits=12, slope=0.5, intercept=-100,
                 window=(k - 700, 800))
    assert np.abs(stored_16bit(m1w).astype(int) - stored_16bit(m2w)).max() <= 1
    assert decode.decode_file(str(m2)).std() > 0.2


@pytest.mark.parametrize("bits, signed, big_endian", [(8, False, False), (12, False, True), (16, True, False),
                                                      (16, False, True)])
def test_bit_depths_signedness_and_endianness(tmp_path, bits, signed, big_endian):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    stored = np.linspace(lo, hi - 1, 30 * 20).reshape(30, 20).round()
    path = _write(tmp_path / "x.dcm", stored, "MONOCHROME2", bits=bits, signed=signed, big_endian=big_endian,
                  slope=2.0, intercept=-1024)
    image = decode.decode_file(str(path))
    values = stored * 2.0 - 1024
    np.testing.assert_allclose(image, (values - values.min()) / (values.max() - values.min()), atol=1e-6)


def test_multi_frame_policy(tmp_path):
    frames = np.stack([np.full((8, 8), v) for v in (0, 100, 4000)]).astype(np.uint16)
    frames[:, 0, 0], frames[:, 0, 1] = 4095, 0  # give each frame the full range
    path = _write(tmp_path / "mf.dcm", frames, "MONOCHROME2", bits=12, frames=3)
    middle = decode.decode_file(str(path), "middle")
    first = decode.decode_file(str(path), "first")
    assert middle[4, 4] == pytest.approx(100 / 4095, abs=1e-6)
    assert first[4, 4] == pytest.approx(0.0, abs=1e-6)


def test_png_and_jpeg(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), ramp)
    np.testing.assert_allclose(decode.decode_file(str(tmp_path / "a.png")), ramp / 65535, atol=1e-7)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 200  # BGR red
    cv2.imwrite(str(tmp_path / "b.jpg"), rgb)
    assert decode.decode_file(str(tmp_path / "b.jpg")).mean() == pytest.approx(0.299 * 200 / 255, abs=0.02)
    (tmp_path / "c.png").write_bytes(decode.PNG_MAGIC + b"garbage")
    with pytest.raises(decode.DecodeError) as err:
        decode.decode_file(str(tmp_path / "c.png"))
    assert err.value.reason == "unreadable_image"


def test_resize_aspect_policies():
    tall = np.zeros((40, 20), np.float32)
    tall[:, :] = 1.0
    padded = decode.resize(tall, 20, "pad")
    assert padded.shape == (20, 20) and padded[:, :5].max() == 0 and padded[:, 5:15].min() > 0.99
    cropped = decode.resize(tall, 20, "crop")
    assert cropped.min() == 1.0
    assert decode.resize(tall, 20, "stretch").shape == (20, 20)
    png = decode.encode_png(padded, 16)
    back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.max() == 65535
