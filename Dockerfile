# The medtl image for GPU clusters (and the cpu-smoke overlay): Python 3.11 with the pins of
# setup.cfg (TensorFlow with its CUDA wheels), Horovod built with NCCL, OpenMPI and Gloo, and
# OpenSSH for the Kubeflow mpi-operator. Runs as the non-root user medtl (uid 1000), under tini
# (PID 1 passes SIGTERM on to medtl and reaps zombies; medtl's exit code is the container's).
#   docker build -t registry.local/medtl:0.1.0 .      (or: make image IMAGE=registry.local/medtl:0.1.0)
# One list of versions: setup.cfg for pip, HOROVOD_VERSION as in the Makefile (a test checks both).
ARG CUDA_TAG=12.3.2-devel-ubuntu22.04
ARG CUDA_RUNTIME_TAG=12.3.2-runtime-ubuntu22.04

# ---------------------------------------------------------------- build: the venv, Horovod compiled into it
FROM nvidia/cuda:${CUDA_TAG} AS build
ARG HOROVOD_VERSION=0.28.1
ENV DEBIAN_FRONTEND=noninteractive
# The devel image brings nvcc, the CUDA headers and libnccl-dev that Horovod's NCCL ops build against.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv cmake g++ make libopenmpi-dev openmpi-bin \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/medtl && /opt/medtl/bin/pip install --upgrade pip setuptools wheel
COPY setup.cfg setup.py pyproject.toml README.md /src/
COPY medtl /src/medtl
# The job configs ship inside the package (setup.py maps jobs/ to medtl/jobs): `medtl demo` and
# `--config jobs/X.yaml` find them in the image as after any wheel install.
COPY jobs /src/jobs
# The pinned stack exactly as `make venv` installs it; the gpu extra adds TensorFlow's CUDA libraries.
RUN /opt/medtl/bin/pip install "/src[gpu]"
# As the Makefile's Horovod step, with MPI and NCCL on: compiled against the TensorFlow above.
RUN HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_GPU_OPERATIONS=NCCL \
        HOROVOD_NCCL_LINK=SHARED HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
        /opt/medtl/bin/pip install --no-build-isolation --no-cache-dir horovod==${HOROVOD_VERSION} \
    && /opt/medtl/bin/python -c "import horovod.tensorflow as h; \
assert h.nccl_built() and h.mpi_built() and h.gloo_built(), 'Horovod lacks NCCL, MPI or Gloo'"

# ---------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_RUNTIME_TAG}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 libopenmpi3 openmpi-bin openssh-client openssh-server tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/medtl /opt/medtl
ENV PATH=/opt/medtl/bin:$PATH

# mpi-operator v2: the launcher reaches the workers over SSH as this user, with the job's key pair
# that the operator mounts at sshAuthMountPath (/home/medtl/.ssh). The workers run a non-root sshd
# on an unprivileged port, so no capability is needed. The image holds no host key: each worker
# pod generates its own into an emptyDir at /etc/ssh/medtl-host (the init container in
# k8s/base/train.yaml), never the operator's user key. StrictModes stays on (the default): the
# operator's secret mount and the emptyDir HOME are world-writable, so sshd reads the authorized
# key through AuthorizedKeysCommand (a root-owned cat), which StrictModes does not apply to. The
# launcher does not check host keys (they are new in every pod); the NetworkPolicy in k8s/base/networkpolicy.yaml
# admits only the launcher to port 2222. With readOnlyRootFilesystem, HOME and /tmp are emptyDirs.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash medtl \
    && mkdir -p /run/sshd /etc/ssh/medtl-host \
    && printf 'Host *\n    Port 2222\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n' \
        > /etc/ssh/ssh_config.d/medtl.conf \
    && printf '%s\n' 'Port 2222' 'HostKey /etc/ssh/medtl-host/ssh_host_ed25519_key' 'PidFile /tmp/sshd.pid' \
        'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'PermitRootLogin no' 'AllowUsers medtl' \
        'AuthorizedKeysFile none' 'AuthorizedKeysCommand /usr/bin/cat /home/medtl/.ssh/authorized_keys' \
        'AuthorizedKeysCommandUser medtl' \
        > /etc/ssh/medtl_sshd_config
USER medtl
# The pods mount an emptyDir here (the root filesystem is read-only); HOME says so to every process.
ENV HOME=/home/medtl
WORKDIR /home/medtl
EXPOSE 2222
# tini as PID 1: it forwards SIGTERM (a pod being stopped) to medtl, which then ends training after
# the step in progress (docs/training.md), and it reaps the processes mpirun and sshd leave behind.
ENTRYPOINT ["tini", "--", "medtl"]
CMD ["--help"]
