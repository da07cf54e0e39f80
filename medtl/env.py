"""`medtl env`: what this machine runs medtl with (versions, Horovod build, CPU, GPUs)."""
from __future__ import annotations

import platform
from importlib import metadata

import medtl


def _version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


# CPU features that change which kernels TensorFlow runs (oneDNN is on by default with the last four).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_description() -> str:
    """One line naming the CPU model, its kernel-relevant ISA flags and whether TF's oneDNN ops are on.

    oneDNN's fused kernels differ from Eigen's in floating-point details (its fused ReLU maps NaN
    to 0), so a result that differs between machines should name this line.
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform is all there is
        pass
    isa = ", ".join(f for f in _ISA_FLAGS if f in flags) or "none of " + "/".join(_ISA_FLAGS)
    return f"{model} ({isa}); TensorFlow oneDNN ops {_onednn_state()}"


def _onednn_state() -> str:
    from medtl.tf import tf  # noqa: F401  (TensorFlow decides at import, from TF_ENABLE_ONEDNN_OPTS and the CPU)

    try:
        from tensorflow.python.util import _pywrap_util_port

        return "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except (ImportError, AttributeError):  # a TensorFlow build without this query
        return "unknown"


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
        ("CPU", cpu_description()),
        ("GPUs", ", ".join(g.name for g in gpus) if gpus else "none (CPU only)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
