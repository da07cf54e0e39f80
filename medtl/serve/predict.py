"""`medtl predict`: an exported model on new DICOM/PNG/JPEG files, one CSV row per file.

Files go through ingest's decode path (medtl.data.decode: decode_file -> resize with
the export's aspect policy and stored size -> PNG at its bit depth) and then the
export's bytes signature, so a study is seen as it would have been in training.
A file that cannot be decoded gets a row with status 'error' and the reason.

The CSV is the user's own output beside their own inputs, so by default it names each
file by its path (relative to --images). With ids_only it names each by its salted study
id instead (deid.salted_hash of that relative path: the key ingest stores for the same
file under the same salt), and reasons are cleared of the file's names: such a CSV can
leave the hospital with the records.

With saliency_dir, each predicted file also gets a folder there, named as its CSV row names it
(path or salted id), holding per label <label>.png (the Grad-CAM map over the image) and
<label>.heatmap.png (the map alone, 8-bit grey, 255 = the map's maximum).
"""
from __future__ import annotations

import csv
import os
import re

from medtl.data import decode, deid
from medtl.errors import MedtlError
from medtl.serve.meta import ExportMeta, check_saliency, load_savedmodel, read_meta
from medtl.utils.log import log
from medtl.utils.progress import Progress


def list_inputs(images: str) -> tuple[str, list[str]]:
    """(base folder, file paths relative to it): every non-hidden file of a folder (recursively,
    since DICOM files often have no extension), or the 'path' column of a CSV (relative to the CSV)."""
    if os.path.isdir(images):
        found = []
        for root, dirs, files in os.walk(images):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.relpath(os.path.join(root, f), images) for f in sorted(files) if not f.startswith(".")]
        if not found:
            raise MedtlError(f"images folder {images} holds no files; pass a folder of DICOM/PNG/JPEG studies")
        return images, found
    if not os.path.isfile(images):
        raise MedtlError(f"--images {images} does not exist; pass a folder of studies or a CSV with a 'path' column")
    try:
        with open(images, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or []):
                raise MedtlError(f"--images {images}: a CSV needs a 'path' column (one study file per row); "
                                 f"found columns {reader.fieldnames}")
            paths = [row["path"] for row in reader if (row["path"] or "").strip()]
    except UnicodeDecodeError:
        raise MedtlError(f"--images {images} is neither a folder nor a UTF-8 CSV") from None
    if not paths:
        raise MedtlError(f"--images {images} lists no files in its 'path' column")
    return os.path.dirname(os.path.abspath(images)), paths


def prepare(path: str, meta: ExportMeta) -> tuple[bytes | None, str]:
    """(stored-format PNG bytes, '') or (None, 'reason: message')."""
    # Burned-in text is allowed here: nothing of the pixels is stored or shared, only probabilities.
    png, reason, message = decode.to_stored_png(path, meta.stored_image_size, meta.bit_depth, meta.aspect,
                                                meta.frame, allow_burned_in=True)
    return (png, "") if png is not None else (None, f"{reason}: {message}")


def output_columns(label_names, ids_only: bool = False) -> list[str]:
    return (["study" if ids_only else "file", "status", "reason"] + [f"{n}_probability" for n in label_names]
            + [f"{n}_decision" for n in label_names])


def _namer(base: str, ids_only: bool, salt_file: str | None):
    """(file -> its name in the CSV, (file, reason) -> the reason as written)."""
    if not ids_only:
        return (lambda f: f), (lambda f, reason: reason)
    salt = deid.load_salt(salt_file)
    return (lambda f: deid.salted_hash(salt, f)), (lambda f, reason: deid.redact(reason, f, base))


def predict_files(model_dir: str, images: str, out: str, batch_size: int = 32, ids_only: bool = False,
                  salt_file: str | None = None, saliency_dir: str | None = None) -> dict:
    """Write `out` (CSV), naming files by path or, with `ids_only`, by salted study id, and with
    `saliency_dir` the Grad-CAM overlays; returns {'files', 'predicted', 'errors'}."""
    meta = read_meta(model_dir)
    if saliency_dir:
        check_saliency(meta, model_dir)
    base, files = list_inputs(images)
    name, clear = _namer(base, ids_only, salt_file)
    from medtl.tf import tf

    loaded = load_savedmodel(model_dir)  # keep a reference: signatures do not own the variables
    signature = loaded.signatures["saliency_bytes" if saliency_dir else "predict_bytes"]
    names = meta.label_names
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    errors = 0
    with open(out, "w", newline="", encoding="utf-8") as fh, Progress(len(files), "predict") as bar:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(output_columns(names, ids_only))
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            prepared = [prepare(os.path.join(base, f), meta) for f in chunk]
            ok = [png for png, _ in prepared if png is not None]
            if ok:
                result = signature(image_bytes=tf.constant(ok))
                probs, decisions = result["probabilities"].numpy(), result["decisions"].numpy()
                if saliency_dir:
                    write_overlays(saliency_dir, [name(f) for f, (png, _) in zip(chunk, prepared) if png is not None],
                                   result["images"].numpy(), result["saliency"].numpy(), names)
            row_of_ok = iter(range(len(ok)))
            for f, (png, reason) in zip(chunk, prepared):
                if png is None:
                    errors += 1
                    writer.writerow([name(f), "error", clear(f, reason)] + [""] * (2 * len(names)))
                    continue
                j = next(row_of_ok)
                writer.writerow([name(f), "ok", ""] + [f"{p:.8f}" for p in probs[j]]
                                + [int(d) for d in decisions[j]])
            bar(len(chunk))
    log(f"predict: {len(files) - errors} of {len(files)} files predicted, {errors} could not be decoded "
        f"(status 'error' with the reason in {out})")
    if saliency_dir:
        log(f"predict: Grad-CAM overlays of {len(files) - errors} files in {saliency_dir}; they show the images' "
            "pixels, which can carry burned-in text (names, dates): keep them where the images may be")
    return {"files": len(files), "predicted": len(files) - errors, "errors": errors}


# --------------------------------------------------------------------------- saliency overlays


def overlay_folder(saliency_dir: str, name: str) -> str:
    """The folder of one file's overlays: its CSV name as a path below saliency_dir, never above it
    (a listed path may be absolute or climb with '..')."""
    parts = [("__" if p == ".." else p) for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    return os.path.join(saliency_dir, *parts)


def label_file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def write_overlays(saliency_dir: str, file_names: list[str], images, maps, label_names) -> None:
    """images (n, size, size, c) in [0, 255], maps (n, size, size, L) in [0, 1]: per file and label,
    <label>.png (overlay) and <label>.heatmap.png (the map, 8-bit)."""
    import cv2
    import numpy as np

    from medtl.models.saliency import write_overlay_png

    for file_name, image, file_maps in zip(file_names, images, maps):
        folder = overlay_folder(saliency_dir, file_name)
        os.makedirs(folder, exist_ok=True)
        for k, label in enumerate(label_names):
            stem = os.path.join(folder, label_file_stem(label))
            write_overlay_png(stem + ".png", image, file_maps[..., k])
            cv2.imwrite(stem + ".heatmap.png", np.round(np.clip(file_maps[..., k], 0, 1) * 255).astype(np.uint8))
