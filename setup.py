"""Packaging beyond setup.cfg: the top-level jobs/ folder ships inside the package as medtl/jobs.

jobs/ stays where kustomize (k8s/) and the docs expect it; package_dir maps it to medtl/jobs in a
wheel, so `medtl demo` and `--config jobs/X.yaml` work after a wheel install and in the container
image. medtl.jobfiles finds the job files in a wheel and in a source checkout alike.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["medtl", "medtl.*"]) + ["medtl.jobs", "medtl.jobs.search", "medtl.jobs.heads",
                                                            "medtl.jobs.label_maps"],
    package_dir={"medtl.jobs": "jobs"},  # the subpackages follow: jobs/search, jobs/heads, jobs/label_maps
    package_data={"medtl": ["py.typed"], "medtl.jobs": ["*.yaml"], "medtl.jobs.search": ["*.yaml"],
                  "medtl.jobs.heads": ["*.yaml"], "medtl.jobs.label_maps": ["*.yaml"]},
)
