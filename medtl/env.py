"""`medtl env`: what this machine runs medtl with (versions, Horovod build, GPUs)."""
from __future__ import annotations

import platform
from importlib import metadata

import medtl


def _version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices_in_use() -> list[str]:
    """The devices this process trains on, e.g. ['CPU', 'GPU:0 (NVIDIA A100-SXM4-40GB)'] (under
    Horovod, the one GPU pinned to this rank). Does not start TensorFlow's runtime."""
    from medtl.tf import tf

    names = ["CPU"]
    for gpu in tf.config.get_visible_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        name = gpu.name.replace("/physical_device:", "")
        names.append(f"{name} ({details['device_name']})" if details.get("device_name") else name)
    return names


def describe() -> str:
    from medtl import dist
    from medtl.tf import tf

    hvd = dist.horovod_info()
    if hvd.get("version"):
        built = ", ".join(k for k in ("gloo", "mpi", "nccl") if hvd[k]) or "no controllers"
        horovod = f"{hvd['version']} (built with: {built})"
    else:
        horovod = f"not available ({hvd.get('error')}); run `make horovod`"
    try:
        import tensorflow_io as tfio

        tfio_version = tfio.__version__
    except Exception as exc:  # tensorflow-io fails to import on a mismatched TF
        tfio_version = f"{_version('tensorflow-io')} (import failed: {str(exc).splitlines()[0][:80]})"
    gpus = tf.config.list_physical_devices("GPU")
    rows = [
        ("medtl", medtl.__version__),
        ("python", platform.python_version()),
        ("tensorflow", tf.__version__),
        ("tf-keras", _version("tf-keras") + f" (tf.keras is {tf.keras.__name__})"),
        ("horovod", horovod),
        ("tensorflow-io", tfio_version),
        ("albumentations", _version("albumentations")),
        ("scikit-learn", _version("scikit-learn")),
        ("pydicom", _version("pydicom")),
        ("numpy", _version("numpy")),
        ("GPUs", ", ".join(g.name for g in gpus) if gpus else "none (CPU only)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
