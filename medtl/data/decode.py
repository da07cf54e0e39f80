"""Study files (DICOM, PNG, JPEG) to display-ready grayscale pixels, and back to the bytes ingest stores
(a lossless PNG, or raw little-endian pixels that need no decode: ENCODINGS).

One decode path serves ingest and `medtl predict`, so a model sees the same
pixels at training and at inference time.

DICOM policy (documented in docs/ingest.md):
  stored value -> modality LUT (rescale slope/intercept or LUT) -> VOI LUT or
  window (first one in the file; the image's full range when it has none) ->
  MONOCHROME1 inverted -> scaled to [0, 1]. Multi-frame: the middle frame (or
  the first, by option). Colour images (secondary captures) become luminance.
  A file whose BurnedInAnnotation (0028,0301) is YES is refused (burned_in_annotation)
  unless allowed: pixels are never scrubbed, so text burned into them would be kept.
"""
from __future__ import annotations

import os

import numpy as np

from medtl.data import fields as study_fields

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ASPECT_POLICIES = ("pad", "crop", "stretch")
# Names of study files in a folder (files without a suffix are told apart by their first bytes: sniff).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# How records store an image: png (zlib-compressed, decoded every epoch) or raw (the pixels as they are,
# uint8 or uint16 little-endian by bit depth, row by row: read with a reshape). docs/ingest.md has the trade-off.
ENCODINGS = ("png", "raw")


class DecodeError(Exception):
    """A study file that cannot be turned into pixels. `reason` is a stable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _normalise(values: np.ndarray, lo: float, hi: float, invert: bool = False) -> np.ndarray:
    """Map lo -> 0 and hi -> 1 (hi < lo flips, as pydicom's negative-slope windowing does), in float64."""
    values = values.astype(np.float64)
    if hi == lo:
        return np.zeros(values.shape, np.float32)
    image = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return (1.0 - image if invert else image).astype(np.float32)


def _to_gray(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        rgb = pixels[..., :3].astype(np.float64)
        return rgb @ np.array([0.299, 0.587, 0.114])
    return pixels


FRAME_POLICIES = ("middle", "first")


def _read_dataset(path: str, stop_before_pixels: bool = False):
    """pydicom Dataset; files without the 128-byte preamble/meta are read with force."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types for garbage input
        raise DecodeError("not_dicom", f"DICOM header unreadable ({type(exc).__name__})") from None
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise DecodeError("not_dicom", f"not a DICOM file ({type(exc).__name__})") from None
    if len(ds) == 0 or ("PixelData" not in ds and "Rows" not in ds and "SOPClassUID" not in ds):
        raise DecodeError("not_dicom", "not a DICOM file (no DICM preamble and no recognisable elements)")
    return ds


def _pixels(ds):
    """ds.pixel_array, with failures mapped to quarantine reasons."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None and not getattr(ds, "is_little_endian", None) is not None:
        raise DecodeError("unsupported_transfer_syntax", "no Transfer Syntax UID in the file meta")
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        raise DecodeError("unsupported_transfer_syntax",
                          f"no installed decoder handles transfer syntax {syntax}: {detail[:200]}") from None
    except AttributeError as exc:
        text = str(exc).splitlines()[0][:200]
        if "Transfer Syntax" in text:
            raise DecodeError("unsupported_transfer_syntax", "no Transfer Syntax UID in the file meta") from None
        raise DecodeError("bad_image_header", f"image attributes missing or invalid: {text}") from None
    except (ValueError, EOFError, KeyError, TypeError) as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        low = text.lower()
        if "less than expected" in low or "truncat" in low or "length of the pixel data" in low:
            raise DecodeError("truncated_pixel_data", f"pixel data shorter than the header says: {text}") from None
        raise DecodeError("bad_image_header", f"pixel data unreadable: {text}") from None
    except Exception as exc:
        raise DecodeError("undecodable_pixels", f"pixel data unreadable ({type(exc).__name__})") from None


def _check_burned_in(ds) -> None:
    """The header's own privacy signal: text burned into the pixels (which medtl never scrubs)."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise DecodeError("burned_in_annotation", "BurnedInAnnotation (0028,0301) is YES: the pixels carry text "
                          "that may identify the patient; scrub the file or allow it with --allow-burned-in")


def decode_dicom(path: str, frame: str = "middle", allow_burned_in: bool = False) -> np.ndarray:
    """A DICOM file as float32 (H, W) in [0, 1], following the policy in the module docstring."""
    import warnings

    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    with warnings.catch_warnings():
        # pydicom warns about fixable oddities (padding, VR mismatches); the outcome is what counts.
        warnings.simplefilter("ignore")
        ds = _read_dataset(path)
        if not allow_burned_in:
            _check_burned_in(ds)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DecodeError("no_pixel_data", "DICOM file has no pixel data (PixelData element)")
        _check_frame_count(ds)
        pixels = _pixels(ds)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if frames > 1:
            pixels = pixels[frames // 2 if frame == "middle" else 0]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if samples > 1:
            gray = _to_gray(pixels)
            return _normalise(gray, float(gray.min()), float(gray.max()))
        if pixels.ndim != 2:
            raise DecodeError("bad_image_header", f"pixel array has shape {pixels.shape}, expected one 2-D frame")
        try:
            values = apply_modality_lut(pixels, ds)
            lo, hi = float(np.min(values)), float(np.max(values))
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
                lo, hi = _voi_output_range(ds)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise DecodeError("bad_image_header", f"modality/VOI LUT unusable: {str(exc).splitlines()[0][:160]}") from None
    return _normalise(values, lo, hi, invert=photometric == "MONOCHROME1")


def _check_frame_count(ds) -> None:
    """Native pixel data holding whole extra frames with no NumberOfFrames: which frame is which is
    unknown, and pydicom would silently return the first. Quarantine it instead."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "NumberOfFrames" in ds or "PixelData" not in ds:
        return
    try:
        if syntax is not None and syntax.is_compressed:
            return
    except ValueError:  # not a transfer syntax UID at all: _pixels reports it
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frame_bytes = rows * columns * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) // 8
        stored = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):
        return  # _pixels reports missing image attributes
    if frame_bytes > 0 and stored >= 2 * frame_bytes:
        raise DecodeError("bad_image_header", f"pixel data holds {stored // frame_bytes} frames of {rows}x{columns} "
                          "but the header has no NumberOfFrames (multi-frame without a frame count)")


def dicom_fields(path: str, names: tuple[str, ...], salt: bytes) -> dict[str, str]:
    """Allow-listed, non-identifying fields (medtl.data.fields) derived from a DICOM file's header."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dataset(path, stop_before_pixels=True)
    return study_fields.from_dicom(ds, names, salt)


def dicom_patient_id(path: str) -> str:
    """The PatientID of a DICOM file ("" when absent), read from its header only. Raises DecodeError."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dataset(path, stop_before_pixels=True)
    return str(ds.get("PatientID", "") or "").strip()


def _voi_output_range(ds) -> tuple[float, float]:
    """The (y_min, y_max) that pydicom's VOI LUT or windowing maps its output onto."""
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2 ** bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def decode_raster(path: str) -> np.ndarray:
    """A PNG or JPEG file (8 or 16 bit, gray or colour) as float32 (H, W) in [0, 1]."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None:
        raise DecodeError("unreadable_image", "PNG/JPEG data could not be decoded (corrupt or truncated)")
    if pixels.ndim == 3:
        pixels = pixels[..., 2::-1] if pixels.shape[-1] >= 3 else pixels[..., 0]  # BGR(A) -> RGB
    top = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 1.0
    return _normalise(_to_gray(pixels), 0.0, top)


def sniff(path: str) -> str:
    """'png', 'jpeg', 'dicom' or 'unknown', from the file's first bytes (not its name)."""
    if os.path.isdir(path):
        return "unknown"
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    if path.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return "unknown"


def decode_file(path: str, frame: str = "middle", allow_burned_in: bool = False) -> np.ndarray:
    """Any supported study file as float32 (H, W) in [0, 1]. Raises DecodeError."""
    if not os.path.exists(path):
        raise DecodeError("missing_file", "listed in the labels table but not found on disk")
    kind = sniff(path)
    if kind in ("png", "jpeg"):
        return decode_raster(path)
    if kind == "dicom":
        return decode_dicom(path, frame, allow_burned_in)
    if os.path.isdir(path):
        raise DecodeError("not_dicom", "is a folder, not an image file")
    # No magic bytes and no .dcm suffix: DICOM without preamble is still possible.
    try:
        return decode_dicom(path, frame, allow_burned_in)
    except DecodeError as exc:
        if exc.reason == "not_dicom":
            raise DecodeError("not_dicom", "not a DICOM, PNG or JPEG file") from None
        raise


def decode_array(pixels: np.ndarray) -> np.ndarray:
    """An in-memory image (e.g. a MedMNIST array, uint8/uint16, gray or RGB) as float32 (H, W) in [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3):
        raise DecodeError("bad_image_header", f"array image has shape {pixels.shape}, expected (H, W) or (H, W, 3)")
    top = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 1.0
    return _normalise(_to_gray(pixels), 0.0, top)


def resize(image: np.ndarray, size: int, aspect: str = "pad") -> np.ndarray:
    """Square `size` x `size` image. aspect: pad (letterbox, black), crop (centre), stretch."""
    import cv2

    if aspect not in ASPECT_POLICIES:
        raise ValueError(f"aspect must be one of {ASPECT_POLICIES}, got {aspect!r}")
    h, w = image.shape
    if aspect == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    elif aspect == "pad" and h != w:
        side = max(h, w)
        canvas = np.zeros((side, side), image.dtype)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = image
        image = canvas
    if image.shape[0] == size and image.shape[1] == size:
        return image.astype(np.float32)
    shrinking = image.shape[0] > size
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    out = cv2.resize(image.astype(np.float32), (size, size), interpolation=interp)
    return np.clip(out, 0.0, 1.0)


def quantise(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """A [0, 1] float image as uint8 or uint16 levels (one quantisation for every stored encoding)."""
    top = (1 << bit_depth) - 1
    return np.round(image * top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def encode_png(image: np.ndarray, bit_depth: int) -> bytes:
    """A [0, 1] float image as lossless grayscale PNG bytes of the given bit depth (8 or 16)."""
    import cv2

    ok, buf = cv2.imencode(".png", quantise(image, bit_depth))
    if not ok:  # pragma: no cover - cv2 only fails on invalid arrays
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_raw(image: np.ndarray, bit_depth: int) -> bytes:
    """A [0, 1] float image as its raw pixels: uint8 or little-endian uint16, row-major (what
    tf.io.decode_raw reads back), quantised as encode_png does, so both store the same values."""
    levels = quantise(image, bit_depth)
    return levels.astype(levels.dtype.newbyteorder("<")).tobytes()


def encode_stored(image: np.ndarray, bit_depth: int, encoding: str) -> bytes:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return encode_png(image, bit_depth) if encoding == "png" else encode_raw(image, bit_depth)


def to_stored_png(source, size: int, bit_depth: int, aspect: str, frame: str = "middle",
                  allow_burned_in: bool = False) -> tuple[bytes | None, str, str]:
    """The stored image as PNG bytes, whatever the records' encoding: what `medtl predict` sends an export."""
    return to_stored(source, size, bit_depth, aspect, frame, allow_burned_in, "png")


def to_stored(source, size: int, bit_depth: int, aspect: str, frame: str = "middle",
              allow_burned_in: bool = False, encoding: str = "png") -> tuple[bytes | None, str, str]:
    """The one path from a study (file path or in-memory array) to the bytes ingest stores:
    (data, "", "") or (None, reason, message). Used by ingest and by `medtl predict`."""
    try:
        image = (decode_array(source) if isinstance(source, np.ndarray)
                 else decode_file(source, frame, allow_burned_in))
        return encode_stored(resize(image, size, aspect), bit_depth, encoding), "", ""
    except DecodeError as exc:
        return None, exc.reason, exc.message
    except MemoryError:
        return None, "too_large", "image too large to decode in memory"
    except OSError as exc:  # permissions, I/O errors: strerror only, since str(exc) quotes the path
        return None, "unreadable_file", f"cannot be read ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # one bad file must not stop the batch
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        return None, "decode_failed", f"{type(exc).__name__}: {text}"
