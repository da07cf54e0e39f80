"""`medtl bench input`: images/s of each input-pipeline stage and of naive loaders, in one run.

    medtl bench input --records DIR --image-size 380   # the train split of DIR
    medtl bench input --image-size 380                  # synthesises 512 px 16-bit shards first

The same studies are read both ways: as PNG shards (--records, or synthetic ones at --source-size)
and as decode-free raw shards at the model input size (ingested from the same synthetic studies, or
made from the first --max-png records of --records). Stages run in turn, for several rounds, and each
keeps its median, so load from other processes spreads over all of them. "Per core" is images per
CPU-second of this process: what one fully busy core delivers, however many cores the process got.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from medtl.config import load_config
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.utils.log import log

# EfficientNetB4 training at 380 px in mixed precision: one A100 (the reference figure), and
# about what an H100-class GPU takes.
GPU_IMAGES_PER_SECOND = {"A100": 470.0, "H100 class": 1000.0}
REFERENCE_GPU = "A100"
GOAL_AUGMENT_RATIO = 0.9  # (c)/(b), both encodings
GOAL_BASELINE_RATIO = 3.0  # (c)/(d)
GOAL_READ_RATIO = 0.5  # (b-raw)/(a-raw): decode-free shards near the read limit
# Cores per reference GPU at (c): decode-free shards, and PNG shards (the goal before raw shards existed).
GOAL_CORES_PER_GPU = {"raw": 1.5, "png": 4.0, "raw, augmentation on the device": 1.5}
# The stage whose per-core rate gives each encoding's cores per GPU.
STAGE_OF_ENCODING = {"png": "c", "raw": "c-raw", "raw, augmentation on the device": "c-dev"}
DISK_IMAGES = 500_000  # the disk figure printed per encoding

STAGES = {
    "a": "png: read + parse, no decode",
    "b": "png: + decode + resize",
    "c": "png: + default augmentation",
    "d": "naive: image_dataset_from_directory",
    "e": "naive: PIL loop, one thread",
    "a-raw": "raw: read + parse",
    "b-raw": "raw: + decode_raw + reshape",
    "c-raw": "raw: + default augmentation",
    "c-dev": "raw: augmentation on the device, CPU part",
}
# (top, bottom, goal or None): the ratios printed, in order.
RATIOS = (("b", "a", None), ("c", "a", None), ("c", "b", GOAL_AUGMENT_RATIO), ("c", "d", GOAL_BASELINE_RATIO),
          ("c", "e", None), ("b-raw", "a-raw", GOAL_READ_RATIO), ("c-raw", "a-raw", None),
          ("c-raw", "b-raw", GOAL_AUGMENT_RATIO), ("b-raw", "b", None), ("c-raw", "c", None),
          ("c-dev", "a-raw", GOAL_READ_RATIO), ("c-dev", "b-raw", None), ("c-dev", "c-raw", None),
          ("c1", "b", None), ("c2", "b", None))
# With --alternatives: other ways to run the augmentation, to re-check the choice of (c).
ALTERNATIVES = {
    "c1": "(c), one numpy_function call per image",
    "c2": "(b) + TF-native ops, batched, no CLAHE",
}


@dataclass(frozen=True)
class BenchOptions:
    records: str | None = None
    image_size: int = 380
    batch_size: int = 32
    seconds: float = 8.0
    rounds: int = 3
    n: int = 256  # synthetic studies when records is None
    source_size: int = 512
    max_png: int = 512  # records exported as PNG files for the naive loaders
    work: str | None = None
    alternatives: bool = False


@dataclass(frozen=True)
class Run:
    images: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def per_core(self) -> float:
        return self.images / max(self.cpu, 1e-9)


def _check(opt: BenchOptions) -> None:
    for name, value, low in (("--image-size", opt.image_size, 32), ("--batch-size", opt.batch_size, 1),
                             ("--rounds", opt.rounds, 1), ("--n", opt.n, 1), ("--source-size", opt.source_size, 32),
                             ("--max-png", opt.max_png, 1)):
        if value < low:
            raise MedtlError(f"{name} must be >= {low}, got {value}")
    if opt.seconds <= 0:
        raise MedtlError(f"--seconds must be > 0, got {opt.seconds}")


def make_sources(work: str, n: int, size: int, image_size: int) -> dict[str, str]:
    """n synthetic studies ingested twice, all in the train split: as size px 16-bit PNG shards, and as
    16-bit raw shards at the model input size. {encoding: records folder}."""
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    studies = os.path.join(work, "studies")
    salt = os.path.join(work, "salt")  # a throwaway secret: never the user's salt file
    with open(salt, "w") as fh:
        fh.write(secrets.token_hex(32))
    log(f"bench: synthesising {n} studies at {size} px into {studies}")
    synthesize(studies, n, seed=0, size=size)
    out = {}
    for encoding, stored in (("png", size), ("raw", image_size)):
        out[encoding] = os.path.join(work, "records" if encoding == "png" else "records-raw")
        ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                             out=out[encoding], image_size=stored, bit_depth=16, val_fraction=0.0, test_fraction=0.0,
                             shard_mb=16.0, salt_file=salt, progress=False, encoding=encoding))
    return out


def transcode(cfg, manifest: Manifest, out: str, encoding: str, size: int, limit: int) -> str:
    """The first `limit` train records of cfg.data.records rewritten in `encoding` at `size` px (area
    resize, as the pipeline does), into one shard of a train-only records folder `out`."""
    import dataclasses

    from medtl.data.decode import encode_stored
    from medtl.data.manifest import Shard, SplitInfo, write_manifest
    from medtl.data.pipeline import build_decode_fn, build_records, shard_paths
    from medtl.data.records import encode_example, shard_name
    from medtl.tf import tf
    from medtl.utils import fs

    os.makedirs(out, exist_ok=True)
    files = shard_paths(cfg.data.records, manifest, "train")
    decode_fn = build_decode_fn(manifest, size, quantise=False, with_ids=True)
    records = build_records(files, True, 0, 1, False, None, True).map(decode_fn).take(limit)
    name, count = shard_name("train", 0, 1), 0
    with tf.io.TFRecordWriter(os.path.join(out, name)) as writer:
        for image, labels, mask, patient, key in records:
            data = encode_stored(image.numpy()[..., 0] / 255.0, manifest.bit_depth, encoding)
            writer.write(encode_example(data, labels.numpy().astype(int), mask.numpy().astype(int),
                                        patient.numpy().decode(), key.numpy().decode(), encoding=encoding))
            count += 1
    path = os.path.join(out, name)
    shard = Shard(file=name, records=count, bytes=fs.size(path), sha256=fs.sha256(path))
    write_manifest(out, dataclasses.replace(manifest, stored_image_size=size, encoding=encoding,
                                            splits={"train": SplitInfo(records=count, shards=(shard,))}))
    log(f"bench: {count} train records of {cfg.data.records} as {size} px {encoding} shards in {out}")
    return out


def export_pngs(cfg, manifest: Manifest, out: str, limit: int) -> list[str]:
    """The first `limit` train records' stored PNG bytes, as files (what the naive loaders read)."""
    from medtl.data.pipeline import build_parse_fn, build_records, shard_paths

    os.makedirs(out, exist_ok=True)
    files = shard_paths(cfg.data.records, manifest, "train")
    records = build_records(files, True, 0, 1, False, None, True).map(build_parse_fn(manifest))
    paths = []
    for i, (png, _, _) in enumerate(records.take(limit)):
        paths.append(os.path.join(out, f"{i:05d}.png"))
        with open(paths[-1], "wb") as fh:
            fh.write(png.numpy())
    return paths


def _batch_sizes(ds):
    """Iterate a dataset, yielding the number of images in each batch."""
    for batch in ds:
        first = batch[0] if isinstance(batch, tuple) else batch
        yield int(first.shape[0])


def pil_batches(paths: list[str], size: int, batch_size: int):
    """The naive loader: open, decode and resize each PNG with PIL in a plain Python loop."""
    from PIL import Image

    i = 0
    while True:
        batch = []
        for _ in range(batch_size):
            with Image.open(paths[i % len(paths)]) as image:
                top = 65535.0 if image.mode.startswith("I") else 255.0
                pixels = np.asarray(image, dtype=np.float32) * (255.0 / top)
            batch.append(np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR)))
            i += 1
        yield len(np.stack(batch))  # (batch, size, size)


def _encoding_streams(cfg, manifest: Manifest, suffix: str) -> dict:
    """Stages (a), (b) and (c) of one records folder: read + parse, + decode + resize, + augmentation."""
    import dataclasses

    from medtl.data.pipeline import AUTOTUNE, build_dataset, build_parse_fn, build_records, shard_paths

    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=()))

    def parse_only():  # the training stream's reading and parsing, without the decode
        files = shard_paths(cfg.data.records, manifest, "train")
        ds = build_records(files, True, 0, 1, True, 0, False).repeat()
        ds = ds.map(build_parse_fn(manifest), num_parallel_calls=AUTOTUNE, deterministic=False)
        return _batch_sizes(ds.batch(cfg.train.batch_size).prefetch(AUTOTUNE))

    streams = {"a" + suffix: parse_only,
               "b" + suffix: lambda: _batch_sizes(build_dataset(plain, "train", manifest=manifest)),
               "c" + suffix: lambda: _batch_sizes(build_dataset(cfg, "train", manifest=manifest))}
    if suffix == "-raw":  # data.augment_on: device: what the input pipeline still does (read, parse, batch)
        streams["c-dev"] = lambda: _batch_sizes(build_dataset(on_device(cfg), "train", manifest=manifest))
    return streams


def on_device(cfg):
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment_on="device"))


def device_step_costs(cfg, manifest: Manifest, batches: int = 4) -> dict:
    """CPU ms per image, in this process, of data.augment_on: device's step inputs (scale, the policy as
    TensorFlow ops, gray to the model's channels) on one batch of the device stream, with the policy and
    without it. In training this runs in the training step, on the GPU when there is one."""
    import dataclasses

    from medtl.data.pipeline import build_dataset, build_step_inputs_fn
    from medtl.tf import tf

    device = on_device(cfg)
    images = next(iter(build_dataset(device, "train", manifest=manifest)))[0]

    def cost(step_cfg) -> float:
        fn = tf.function(build_step_inputs_fn(step_cfg, 0, 0))
        fn(images, tf.constant(0, tf.int64)).numpy()  # traced
        start = time.process_time()
        for b in range(batches):
            fn(images, tf.constant(b + 1, tf.int64)).numpy()
        return (time.process_time() - start) * 1e3 / (batches * int(images.shape[0]))

    plain = dataclasses.replace(device, data=dataclasses.replace(device.data, augment=()))
    return {"policy": cost(device), "plain": cost(plain)}


def stage_streams(sources: dict, pngs: list[str], alternatives: bool = False) -> dict:
    """{stage: a function returning an endless iterator of batch sizes}, stages as in STAGES (and
    ALTERNATIVES). sources: {encoding: (cfg, manifest)} of the png and the raw records."""
    from medtl.tf import tf

    cfg, manifest = sources["png"]
    size, batch_size = cfg.data.image_size, cfg.train.batch_size

    def keras_loader():
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Found N files."
            ds = tf.keras.utils.image_dataset_from_directory(
                os.path.dirname(pngs[0]), labels=None, color_mode="grayscale", batch_size=batch_size,
                image_size=(size, size), shuffle=False)
        return _batch_sizes(ds.repeat())

    streams = {**_encoding_streams(cfg, manifest, ""), "d": keras_loader,
               "e": lambda: pil_batches(pngs, size, batch_size), **_encoding_streams(*sources["raw"], "-raw")}
    if alternatives:
        streams["c1"] = lambda: _alternative_stream(cfg, manifest, per_image_fn=build_per_image_fn(cfg))
        streams["c2"] = lambda: _alternative_stream(cfg, manifest, batch_fn=build_tf_native_fn(size))
    return streams


def _alternative_stream(cfg, manifest: Manifest, per_image_fn=None, batch_fn=None):
    """build_dataset's training stream with its augmentation step swapped for an alternative."""
    from medtl.data.pipeline import AUTOTUNE, build_decoded, build_model_input_fn

    ds = build_decoded(cfg, manifest, "train", 0, 1, True, True, 0)
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=0).repeat().enumerate()
    if per_image_fn is not None:
        ds = ds.map(per_image_fn, num_parallel_calls=AUTOTUNE, deterministic=False)
        ds = ds.batch(cfg.train.batch_size, drop_remainder=True)
    else:
        ds = ds.batch(cfg.train.batch_size, drop_remainder=True)
        ds = ds.map(batch_fn, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.map(build_model_input_fn(cfg.data.channels), num_parallel_calls=AUTOTUNE, deterministic=False)
    return _batch_sizes(ds.prefetch(AUTOTUNE))


def build_per_image_fn(cfg):
    """(c1): the same policy and seeding as (c), but one tf.numpy_function call per image."""
    from medtl.data.augment import BatchAugmenter
    from medtl.tf import tf

    augmenter = BatchAugmenter(cfg.data.augment, (cfg.seed, 0, 0))

    def per_image_fn(index, element):
        image, labels, mask = element  # (size, size, 1) uint8
        out = tf.numpy_function(lambda im, i: augmenter(im[None], i[None])[0], [image, index], tf.uint8,
                                stateful=False)
        return tf.ensure_shape(out, image.shape), labels, mask

    return per_image_fn


def build_tf_native_fn(size: int):
    """(c2): the default policy's simple transforms as batched TF ops (affine, brightness/contrast,
    gamma, noise; CLAHE has no TF op and is left out). For measuring only: it does not follow
    albumentations' sampling exactly."""
    from medtl.tf import tf

    def pick(seed, n, p):  # (n, 1, 1, 1) 1.0 where the transform applies
        return tf.cast(tf.random.stateless_uniform((n, 1, 1, 1), seed) < p, tf.float32)

    def batch_fn(indices, batch):
        images, labels, mask = batch
        x = tf.cast(images, tf.float32)  # (batch, size, size, 1)
        n, seed = tf.shape(x)[0], tf.stack([tf.constant(0, tf.int64), indices[0]])
        u = lambda k, lo, hi, shape=(): tf.random.stateless_uniform((n, *shape), seed + k, lo, hi)  # noqa: E731
        on = tf.cast(u(1, 0.0, 1.0) < 0.7, tf.float32)
        angle, zoom = u(2, -0.122, 0.122) * on, 1.0 + u(3, -0.1, 0.1) * on
        shift = u(4, -0.05 * size, 0.05 * size, (2,)) * on[:, None]
        cos, sin, c = tf.cos(angle) / zoom, tf.sin(angle) / zoom, size / 2.0
        zero = tf.zeros_like(cos)
        matrix = tf.stack([cos, -sin, c - cos * c + sin * c + shift[:, 0],
                           sin, cos, c - sin * c - cos * c + shift[:, 1], zero, zero], axis=1)
        x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=matrix, output_shape=[size, size],
                                                  fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
        on = pick(seed + 5, n, 0.5)
        x = x * (1.0 + on * u(6, -0.1, 0.1)[:, None, None, None]) + on * 255.0 * u(7, -0.1, 0.1)[:, None, None, None]
        on = pick(seed + 8, n, 0.3)
        gamma = 1.0 + on * (u(9, 0.85, 1.18)[:, None, None, None] - 1.0)
        x = 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, gamma)
        x = x + pick(seed + 10, n, 0.2) * tf.random.stateless_normal(tf.shape(x), seed + 11) * 5.0
        return tf.clip_by_value(x, 0.0, 255.0), labels, mask

    return batch_fn


def augment_costs(cfg, manifest: Manifest, batches: int = 4) -> dict:
    """CPU ms per image of each transform of the policy, applied alone at p = 1 (one thread, in this
    process, to the uint8 images the augmentation step gets from `manifest`'s train stream), the same
    times its p (what it costs on average), and the per-image cost of the policy's loop with no transform
    (seeding and Compose). {"transforms": [(name, p, ms when applied, expected ms)], "loop": ms}."""
    import dataclasses

    from medtl.data.augment import BatchAugmenter
    from medtl.data.pipeline import build_decoded

    ds = build_decoded(cfg, manifest, "train", 0, 1, True, True, 0).batch(cfg.train.batch_size)
    images = next(iter(ds))[0].numpy()  # (batch, size, size, 1) uint8
    indices = np.arange(len(images))

    def cost(policy) -> float:
        augmenter = BatchAugmenter(policy, (cfg.seed, 0, 0))
        augmenter(images, indices)  # warm-up: builds the Compose
        start = time.process_time()
        for b in range(batches):
            augmenter(images, indices + b * len(images))
        return (time.process_time() - start) * 1e3 / (batches * len(images))

    loop = cost(())
    rows = []
    for transform in cfg.data.augment:
        args = dict(transform.args)
        p = float(args.get("p", 0.5))  # albumentations' default p
        applied = max(cost((dataclasses.replace(transform, args=tuple({**args, "p": 1.0}.items())),)) - loop, 0.0)
        rows.append((transform.name, p, applied, applied * p))
    return {"transforms": rows, "loop": loop}


def measure(make, seconds: float, warmup_batches: int = 2) -> Run:
    """Images, wall seconds and process CPU seconds over `seconds` of one stream, after a warm-up
    that also covers filling its shuffle buffer."""
    batches = make()
    for _ in range(warmup_batches):
        next(batches)
    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        images += next(batches)
    run = Run(images, time.perf_counter() - wall, time.process_time() - cpu)
    batches.close()
    del batches
    gc.collect()
    time.sleep(0.5)  # the stream's background threads wind down before the next stage starts
    return run


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    return f"{cores} CPU cores ({model})"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _config(records: str, opt: BenchOptions):
    """The production job's input settings (EfficientNetB4, 3 channels, default augmentation). Records
    smaller than --image-size are measured as they are (upsampled), not refused."""
    return load_config(raw={
        "data": {"records": records, "image_size": opt.image_size, "channels": 3, "allow_upsample": True},
        "model": {"backbone": "EfficientNetB4", "weights": "none"},
        "train": {"batch_size": opt.batch_size},
        "phases": [{"name": "bench", "epochs": 1, "learning_rate": 1.0e-3}]})


def storage(manifest: Manifest, image_size: int) -> dict:
    """Bytes per stored train image, and pixels decoded and read per pixel the model uses."""
    split = manifest.splits["train"]
    per_image = sum(s.bytes or 0 for s in split.shards) / max(split.records, 1)
    read = (manifest.stored_image_size / image_size) ** 2
    return {"bytes": per_image, "read": read, "decoded": read if manifest.encoding == "png" else 0.0,
            "size": manifest.stored_image_size}


def summarise(runs: dict[str, list[Run]]) -> dict:
    """Median img/s and per-core img/s of each stage, the ratios the goals are about, and cores per GPU."""
    out: dict = {stage: {"img_s": statistics.median(r.rate for r in rs),
                         "per_core": statistics.median(r.per_core for r in rs),
                         "cores_busy": statistics.median(r.cpu / r.wall for r in rs)} for stage, rs in runs.items()}
    for top, bottom, _ in RATIOS:
        if top in out and bottom in out:
            out[f"{top}/{bottom}"] = {k: out[top][k] / out[bottom][k] for k in ("img_s", "per_core")}
    out["cores_per_gpu"] = {encoding: {gpu: rate / out[stage]["per_core"]
                                       for gpu, rate in GPU_IMAGES_PER_SECOND.items()}
                            for encoding, stage in STAGE_OF_ENCODING.items() if stage in out}
    return out


def _verdict(ratio: dict, goal: float) -> str:
    met = [ratio[k] >= goal for k in ("img_s", "per_core")]
    return "met" if all(met) else "met per core, not in img/s" if met[1] else "not met"


def _stage_lines(result: dict) -> list[str]:
    lines = [f"{'stage':44s} {'img/s':>8s} {'per core':>9s} {'cores busy':>11s}"]
    for stage, label in {**STAGES, **ALTERNATIVES}.items():
        if stage in result:
            row = result[stage]
            lines.append(f"{'(' + stage + ') ' + label:44s} {row['img_s']:8.1f} {row['per_core']:9.1f} "
                         f"{row['cores_busy']:11.2f}")
    lines.append("per core: images per CPU-second of this process, i.e. what one fully busy core delivers")
    return lines


def _ratio_lines(result: dict) -> list[str]:
    lines = []
    for top, bottom, goal in RATIOS:
        ratio = result.get(f"{top}/{bottom}")
        if ratio is not None:
            judged = f"goal >= {goal:g}: {_verdict(ratio, goal)}" if goal else "(for reference)"
            lines.append(f"({top})/({bottom}) = {ratio['img_s']:.2f} in img/s, {ratio['per_core']:.2f} per core"
                         f"   {judged}")
    return lines


def _cores_lines(result: dict) -> list[str]:
    lines = []
    for encoding, stage in STAGE_OF_ENCODING.items():
        if stage not in result:
            continue
        per_core = result[stage]["per_core"]
        for gpu, rate in GPU_IMAGES_PER_SECOND.items():
            cores = result["cores_per_gpu"][encoding][gpu]
            goal = GOAL_CORES_PER_GPU[encoding] if gpu == REFERENCE_GPU else None
            judged = f"goal <= {goal:g}: {'met' if cores <= goal else 'not met'}" if goal else "(for reference)"
            caveat = (" (if the GPU keeps that rate with the augmentation on it: not measured here)"
                      if stage == "c-dev" else "")
            lines.append(f"{encoding}: one {rate:g} img/s GPU ({gpu}) needs {rate:g} / {per_core:.1f} = {cores:.2f} "
                         f"cores at ({stage}){caveat}   {judged}")
    return lines


def _storage_lines(stored: dict, image_size: int) -> list[str]:
    lines = []
    for encoding, info in stored.items():
        decoded = f"{info['decoded']:.2f} decoded" if info["decoded"] else "none decoded"
        lines.append(f"{encoding}: {info['size']} px stored for a {image_size} px input: {decoded}, {info['read']:.2f} "
                     f"read per pixel used; {info['bytes'] / 1024:.1f} KiB per image, "
                     f"{info['bytes'] * DISK_IMAGES / 1e9:.0f} GB per {DISK_IMAGES // 1000}k images")
    return lines


def _augment_lines(result: dict) -> list[str]:
    """Each transform's share of the augmentation, against what (c-raw)/(b-raw) >= the goal allows."""
    costs = result.get("augment_costs")
    if not costs or "b-raw" not in result:
        return []
    per_image = 1e3 / result["b-raw"]["per_core"]  # CPU ms per image of (b-raw)
    allowed = per_image * (1.0 / GOAL_AUGMENT_RATIO - 1.0)
    lines = [f"augmentation, CPU ms per image at the input size (one thread; each transform alone at p = 1, then "
             f"times its p):", f"{'transform':28s} {'p':>5s} {'applied':>8s} {'average':>8s}"]
    for name, p, applied, expected in costs["transforms"]:
        lines.append(f"{name:28s} {p:5.2f} {applied:8.3f} {expected:8.3f}")
    total = sum(row[3] for row in costs["transforms"]) + costs["loop"]
    lines.append(f"{'(seeding and Compose)':28s} {'':5s} {'':8s} {costs['loop']:8.3f}")
    lines.append(f"{'policy':28s} {'':5s} {'':8s} {total:8.3f}")
    lines.append(f"(b-raw) costs {per_image:.3f} ms per image; (c-raw)/(b-raw) >= {GOAL_AUGMENT_RATIO:g} leaves "
                 f"{allowed:.3f} ms for the augmentation: the policy takes {total / max(allowed, 1e-9):.1f} times that")
    return lines


def _device_lines(result: dict) -> list[str]:
    costs = result.get("device_step")
    if not costs or "c-dev" not in result:
        return []
    return [f"augmentation on the device (data.augment_on: device): the training step scales, augments and makes "
            f"the channels; run here on this CPU it costs {costs['policy']:.3f} ms per image with the policy, "
            f"{costs['plain']:.3f} ms without it (on a GPU it runs beside the model's step, "
            f"{1e3 / GPU_IMAGES_PER_SECOND[REFERENCE_GPU]:.2f} ms per image at "
            f"{GPU_IMAGES_PER_SECOND[REFERENCE_GPU]:g} img/s; not measured here)"]


def report(result: dict, header: list[str], stored: dict, image_size: int) -> str:
    augment = _augment_lines(result) + _device_lines(result)
    return "\n".join(header + [""] + _stage_lines(result) + [""] + _storage_lines(stored, image_size) + [""]
                     + _ratio_lines(result) + _cores_lines(result) + ([""] + augment if augment else []))


def run_bench(opt: BenchOptions) -> dict:
    """Measure every stage (rounds x seconds each), print the report, return the figures."""
    _check(opt)
    work = opt.work or tempfile.mkdtemp(prefix="medtl-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        return _run(opt, work)
    finally:
        if opt.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _sources(opt: BenchOptions, work: str) -> dict[str, str]:
    """{encoding: records folder} of the png and raw records the stages read."""
    from medtl.data.manifest import read_manifest

    if not opt.records:
        return make_sources(work, opt.n, opt.source_size, opt.image_size)
    records = opt.records if "://" in opt.records else os.path.abspath(opt.records)
    manifest = read_manifest(records)
    _check_train_records(records, manifest, opt.batch_size)
    other = "raw" if manifest.encoding == "png" else "png"
    # Decode-free shards at the model's size; PNG shards at the raw records' own size.
    size = opt.image_size if other == "raw" else manifest.stored_image_size
    made = transcode(_config(records, opt), manifest, os.path.join(work, f"records-{other}"), other, size,
                     opt.max_png)
    return {manifest.encoding: records, other: made}


def _check_train_records(records: str, manifest: Manifest, batch_size: int) -> None:
    count = manifest.records("train") if "train" in manifest.splits else 0
    if count < batch_size:
        raise MedtlError(f"{records} has {count} train records, fewer than one batch of {batch_size}; "
                         "point --records at a bigger ingest or lower --batch-size")


def _header(opt: BenchOptions, sources: dict, pngs: list[str]) -> list[str]:
    (png_cfg, png), (raw_cfg, raw) = sources["png"], sources["raw"]
    return [f"medtl bench input: {opt.image_size} px input, batch {opt.batch_size}; (a)-(c) read "
            f"{png.stored_image_size} px {png.bit_depth}-bit png shards ({png.records('train')} train records in "
            f"{png_cfg.data.records}; (d) and (e) read {len(pngs)} of them as PNG files); (a-raw)-(c-raw) read "
            f"{raw.stored_image_size} px {raw.bit_depth}-bit raw shards ({raw.records('train')} train records in "
            f"{raw_cfg.data.records}; (c-dev) too, with data.augment_on: device)",
            f"machine: {_machine()}; load average before: {_load()}",
            f"{opt.rounds} round(s) x {opt.seconds:g} s per stage; medians over rounds"]


def _run(opt: BenchOptions, work: str) -> dict:
    from medtl.data.manifest import read_manifest

    sources = {}
    for encoding, records in _sources(opt, work).items():
        manifest = read_manifest(records)
        _check_train_records(records, manifest, opt.batch_size)
        sources[encoding] = (_config(records, opt), manifest)
    pngs = export_pngs(*sources["png"], os.path.join(work, "png"), opt.max_png)
    header = _header(opt, sources, pngs)
    streams = stage_streams(sources, pngs, opt.alternatives)
    runs: dict[str, list[Run]] = {stage: [] for stage in streams}
    for round_index in range(opt.rounds):
        for stage, make in streams.items():
            runs[stage].append(measure(make, opt.seconds))
            log(f"bench: round {round_index + 1}/{opt.rounds} ({stage}) {({**STAGES, **ALTERNATIVES})[stage]}: "
                f"{runs[stage][-1].rate:.1f} img/s, {runs[stage][-1].per_core:.1f} per core")
    header[1] += f", after: {_load()}"
    result = summarise(runs)
    if sources["raw"][0].data.augment:
        result["augment_costs"] = augment_costs(*sources["raw"])
        result["device_step"] = device_step_costs(*sources["raw"])
    stored = {encoding: storage(manifest, opt.image_size) for encoding, (_, manifest) in sources.items()}
    result["storage"] = stored
    print(report(result, header, stored, opt.image_size), flush=True)
    return result
