"""The feature cache of `medtl search`: the frozen base's output per image, computed once.

With the base frozen (and BatchNorm in inference mode), an image's feature map never changes,
so head trials can train on stored features instead of running the base every epoch. The cache
holds the train and val splits, preprocessed as the eval stream does (no augmentation), plus
`search.augmented_copies` augmented copies of each train image. Files are sharded .npz (float32, or float16 with search.cache_dtype):

    FEATURE_CACHE/<backbone>-<size>px-<key>/{train,val}-c<copy>-r<rank>of<ranks>-p<part>.npz
    FEATURE_CACHE/<backbone>-<size>px-<key>/cache.json   (written last: the cache is complete)

The key hashes the backbone, weights (file size and SHA-256 for a weights file), image size,
channels, the records' manifest (shard checksums), the cache form and the augmentation, so a
second search over the same inputs finds the cache and changes to any of them miss it.
Under horovodrun, ranks split the extraction; several independent workers (pods) take a lock
and the others wait for cache.json.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import socket
import time

import numpy as np

from medtl import dist
from medtl.config import Config, to_tree
from medtl.data.manifest import Manifest
from medtl.errors import RunFailure
from medtl.utils import fs
from medtl.utils.log import log
from medtl.utils.progress import Progress

CACHE_FILE = "cache.json"
FORMAT = 2  # 2: train and val rows carry the salted patient hash (subset transfer selects by it)
SPLITS = ("train", "val")
PART_IMAGES = 2048  # images per .npz file
STALE_LOCK_SECONDS = 600  # a lock not touched for this long belongs to a dead extraction
WAIT_SECONDS = 5.0


def cache_meta(cfg: Config, manifest: Manifest) -> dict:
    """Everything the cached features depend on."""
    weights = cfg.model.weights
    weights_id = weights if weights in ("imagenet", "none") else f"sha256:{fs.sha256(weights)}"
    meta = {"format": FORMAT, "backbone": cfg.model.backbone, "weights": weights_id,
            "image_size": cfg.data.image_size, "channels": cfg.data.channels,
            "records": hashlib.sha256(json.dumps({"labels": list(manifest.labels),
                                                  "image_size": manifest.stored_image_size,
                                                  "bit_depth": manifest.bit_depth,
                                                  "splits": {s: manifest.splits[s].to_dict() for s in SPLITS}},
                                                 sort_keys=True).encode()).hexdigest(),
            "pooled": cfg.search.pooled_cache, "augmented_copies": cfg.search.augmented_copies,
            "dtype": cfg.search.cache_dtype}
    if cfg.search.augmented_copies:
        meta["augment"] = to_tree(cfg.data.augment)
    if cfg.search.augmented_copies or weights == "none":  # the augmentation's draws, a random base's weights
        meta["seed"] = cfg.seed
    return meta


def cache_folder(cfg: Config, manifest: Manifest) -> tuple[str, dict]:
    meta = cache_meta(cfg, manifest)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.expanduser(cfg.search.feature_cache)
    name = f"{cfg.model.backbone}-{cfg.data.image_size}px-{'pooled' if cfg.search.pooled_cache else 'maps'}-{key}"
    return os.path.join(root, name), meta


def read_index(folder: str) -> dict | None:
    path = os.path.join(folder, CACHE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- extraction


def _build_extractor(cfg: Config):
    from medtl.models.backbones import Preprocess, build_backbone, get_spec
    from medtl.tf import tf

    size, channels = cfg.data.image_size, cfg.data.channels
    inputs = tf.keras.Input((size, size, channels), name="image")
    x = Preprocess(get_spec(cfg.model.backbone).preprocess, name="preprocess")(inputs)
    if cfg.model.weights == "none":
        # A random base is drawn from the seed: every rank of an extraction, and every extraction under the
        # same cache key, gets the same weights (unseeded, each process drew its own base).
        tf.keras.utils.set_random_seed(cfg.seed)
    base = build_backbone(cfg.model.backbone, cfg.model.weights, size, channels)
    base.trainable = False
    maps = base(x, training=False)  # (batch, h, w, c)
    if cfg.search.pooled_cache:
        outputs = [tf.keras.layers.GlobalAveragePooling2D()(maps), tf.keras.layers.GlobalMaxPooling2D()(maps)]
    else:
        outputs = [maps]
    model = tf.keras.Model(inputs, outputs)
    return tf.function(lambda images: model(images, training=False))


def _streams(cfg: Config, manifest: Manifest, split: str, ctx: dist.Context):
    """(copy index, dataset of (images, labels, mask[, patient, key]) batches) for this rank's part of the
    split; copy 0 (plain) carries the ids, the augmented copies hold the same records in the same order."""
    from medtl.data.augment import build_augment_fn
    from medtl.data.pipeline import build_dataset, build_decoded, build_model_input_fn

    yield 0, build_dataset(cfg, split, ctx.rank, ctx.size, manifest, training=False, with_ids=True)
    if split != "train":
        return
    for copy in range(1, cfg.search.augmented_copies + 1):
        decoded = build_decoded(cfg, manifest, split, ctx.rank, ctx.size, training=False, quantise=True,
                                first_epoch=0)
        ds = decoded.enumerate().batch(cfg.train.batch_size)
        ds = ds.map(build_augment_fn(cfg.data.augment, (cfg.seed, 7919, copy, ctx.rank)))
        yield copy, ds.map(build_model_input_fn(cfg.data.channels))


def _write_part(folder: str, name: str, arrays: dict) -> str:
    with fs.atomic_path(os.path.join(folder, name)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return name


def _extract_rank(cfg: Config, manifest: Manifest, folder: str, ctx: dist.Context, lock: str | None) -> list[dict]:
    """Extract this rank's share of every split and copy; returns the files written."""
    from medtl.data.pipeline import pipeline_errors

    extractor = _build_extractor(cfg)
    copies = 1 + cfg.search.augmented_copies
    total = sum(manifest.records(s) for s in SPLITS) + \
        manifest.records("train") * (copies - 1)
    written = []
    # Rank 0 draws the bar for all ranks (its own count x ranks: ranks' shares are about equal).
    with Progress(total, "extract features", enabled=ctx.primary) as bar:
        for split in SPLITS:
            for copy, ds in _streams(cfg, manifest, split, ctx):
                buffers: dict[str, list] = {}
                part = 0

                def flush():
                    nonlocal part
                    if not buffers.get("labels"):
                        return
                    arrays = {k: np.concatenate(v) for k, v in buffers.items()}
                    name = f"{split}-c{copy}-r{ctx.rank}of{ctx.size}-p{part:04d}.npz"
                    written.append({"file": _write_part(folder, name, arrays), "split": split, "copy": copy,
                                    "images": int(len(arrays["labels"]))})
                    buffers.clear()
                    part += 1

                with pipeline_errors():
                    for batch in ds:
                        images, labels, mask = batch[:3]
                        if copy == 0:  # salted hashes only, as in predictions.npz
                            buffers.setdefault("patient", []).append(
                                np.array([p.decode("ascii") for p in batch[3].numpy()], dtype="<U32"))
                        out = extractor(images)
                        out = out if isinstance(out, (list, tuple)) else [out]  # one output: a bare tensor
                        feats = {"avg": out[0], "max": out[1]} if cfg.search.pooled_cache else {"maps": out[0]}
                        for key, value in feats.items():
                            buffers.setdefault(key, []).append(value.numpy().astype(cfg.search.cache_dtype))
                        buffers.setdefault("labels", []).append(labels.numpy().astype(np.uint8))
                        buffers.setdefault("mask", []).append(mask.numpy().astype(np.uint8))
                        bar(min(int(labels.shape[0]) * ctx.size, total - bar.done))
                        if lock:
                            os.utime(lock)  # heartbeat: the extraction is alive
                        if sum(len(b) for b in buffers["labels"]) >= PART_IMAGES:
                            flush()
                flush()
    return written


def _take_lock(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{socket.gethostname()}:{os.getpid()}\n")
    return True


def _wait_for_other(folder: str, lock: str) -> bool:
    """Wait while another worker extracts; True when its cache is complete, False if it died."""
    log(f"search: another worker is extracting features into {folder} ({open(lock).read().strip()}); waiting")
    while True:
        if read_index(folder) is not None:
            return True
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return read_index(folder) is not None
        if age > STALE_LOCK_SECONDS:
            log(f"search: the lock {lock} was not touched for {age:.0f} s; taking over the extraction")
            os.remove(lock)
            return False
        time.sleep(WAIT_SECONDS)


def ensure_cache(cfg: Config, manifest: Manifest, ctx: dist.Context) -> tuple[str, dict, bool]:
    """(cache folder, its index, whether this run extracted it). Reuses a complete cache."""
    folder, meta = cache_folder(cfg, manifest)
    lock = folder + ".lock"
    action = None
    if ctx.primary:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        while action is None:
            if read_index(folder) is not None:
                action = "reuse"
            elif _take_lock(lock):
                action = "extract"
            elif _wait_for_other(folder, lock):
                action = "reuse"
    action = dist.broadcast_object(ctx, action, "cache_action")
    if action == "reuse":
        index = read_index(folder) if ctx.primary else None
        index = dist.broadcast_object(ctx, index, "cache_index")
        log(f"search: reusing the feature cache {folder} ({index['images']['train']} train, "
            f"{index['images']['val']} val images, extracted in {index['seconds']:.1f} s by an earlier run)")
        return folder, index, False
    try:
        if ctx.primary:
            for stale in glob.glob(os.path.join(folder, "*.npz*")):
                os.remove(stale)  # parts of an interrupted extraction
            os.makedirs(folder, exist_ok=True)
        dist.broadcast_object(ctx, True, "cache_folder_ready")
        log(f"search: extracting {cfg.model.backbone} features at {cfg.data.image_size} px "
            f"({'pooled vectors' if cfg.search.pooled_cache else 'spatial maps'}, "
            f"{cfg.search.augmented_copies} augmented copies) into {folder} on {ctx.size} rank(s)")
        start = time.monotonic()
        files = _extract_rank(cfg, manifest, folder, ctx, lock if ctx.primary else None)
        gathered = _gather(ctx, files)
        seconds = dist.allreduce_mean(ctx, time.monotonic() - start, "extract_seconds")
        index = None
        if ctx.primary:
            shape = _feature_shape(folder, gathered)
            index = {"meta": meta, "files": gathered, "seconds": seconds, "ranks": ctx.size,
                     "feature_shape": shape, "labels": list(manifest.labels),
                     "images": {s: sum(f["images"] for f in gathered if f["split"] == s and f["copy"] == 0)
                                for s in SPLITS}}
            fs.write_text_atomic(os.path.join(folder, CACHE_FILE), json.dumps(index, indent=1))
            size_mb = sum(os.path.getsize(os.path.join(folder, f["file"])) for f in gathered) / 1e6
            log(f"search: features extracted in {seconds:.1f} s: {len(gathered)} file(s), {size_mb:.1f} MB, "
                f"feature shape {tuple(shape)}")
        index = dist.broadcast_object(ctx, index, "cache_index")
        return folder, index, True
    finally:
        if ctx.primary and os.path.exists(lock):
            os.remove(lock)


def _gather(ctx: dist.Context, files: list[dict]) -> list[dict]:
    return [f for rank_files in dist.allgather_objects(ctx, files, "cache_files") for f in rank_files]


def _feature_shape(folder: str, files: list[dict]) -> list[int]:
    with np.load(os.path.join(folder, files[0]["file"])) as data:
        key = "maps" if "maps" in data else "avg"
        return list(data[key].shape[1:])


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class SplitFeatures:
    # copy -> (n, ...) float32 features (for a pooled cache, keys "avg"/"max" per copy)
    features: dict
    labels: np.ndarray    # (n, num_labels) float32
    mask: np.ndarray      # (n, num_labels) float32
    patients: np.ndarray  # (n,) salted patient hashes

    def select(self, rows: np.ndarray) -> "SplitFeatures":
        """These rows only (a subset of the split's images), every copy alike."""
        return SplitFeatures({c: {k: v[rows] for k, v in f.items()} for c, f in self.features.items()},
                             self.labels[rows], self.mask[rows], self.patients[rows])


def load_split(folder: str, index: dict, split: str) -> SplitFeatures:
    """A split's cached features, copies in the same image order."""
    by_copy: dict[int, dict[str, list]] = {}
    files = sorted((f for f in index["files"] if f["split"] == split), key=lambda f: f["file"])
    labels = mask = patients = None
    for copy in sorted({f["copy"] for f in files}):
        parts: dict[str, list] = {}
        for f in (f for f in files if f["copy"] == copy):
            path = os.path.join(folder, f["file"])
            if not os.path.exists(path):
                raise RunFailure(f"feature cache file {path} is missing; delete {folder} to extract it again")
            with np.load(path) as data:
                for key in data.files:
                    parts.setdefault(key, []).append(data[key])
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        if copy == 0:
            labels, mask = arrays["labels"].astype(np.float32), arrays["mask"].astype(np.float32)
            patients = arrays["patient"]
        by_copy[copy] = {k: v.astype(np.float32) for k, v in arrays.items() if k not in ("labels", "mask", "patient")}
    if labels is None:
        raise RunFailure(f"the feature cache {folder} holds no {split} images; delete it to extract it again")
    return SplitFeatures(by_copy, labels, mask, patients)
