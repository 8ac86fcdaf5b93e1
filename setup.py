"""Packaging for the `dinov2` package (BBU quality-control edition)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    text = (HERE / "dinov2" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def read_requirements(name: str) -> list:
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="dinov2",
    version=read_version(),
    description="DINOv2 self-supervised pretraining and QC evaluation for industrial images",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dinov2", "dinov2.*"]),
    package_data={"": ["*.yaml"]},
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "dev": read_requirements("requirements-dev.txt") + read_requirements("requirements-export.txt")
        + read_requirements("requirements-convert.txt"),
        "export": read_requirements("requirements-export.txt"),
        "convert": read_requirements("requirements-convert.txt"),
        "xformers": ["xformers"],
    },
)
