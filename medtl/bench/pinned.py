"""Run a command pinned to one CPU core, chosen by the Horovod local rank.

`medtl bench train --scaling` launches each rank as
`horovodrun ... python -m medtl.bench.pinned python -m medtl train ...`, so that the
1-rank baseline gets one core and the 2-rank run two: an intra-op thread limit alone
leaves tf.data's own thread pool free to use the other core in the baseline.
"""
from __future__ import annotations

import os
import sys


def local_rank(environ=os.environ) -> int:
    for name in ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m medtl.bench.pinned COMMAND [ARG ...]")
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[local_rank() % len(cores)]})
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
