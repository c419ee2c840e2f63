"""Package discovery only; all metadata lives in pyproject.toml.

methods/, baselines/ and configs/ install under distinct names (fqtbench_methods,
fqtbench_baselines, fqtbench_configs) so that nothing generic lands in site-packages.
"""
from setuptools import find_packages, setup

MAPPED = {"fqtbench_methods": "methods", "fqtbench_baselines": "baselines", "fqtbench_configs": "configs"}

packages = find_packages(include=["fqtbench", "fqtbench.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir={"fqtbench": "fqtbench", **MAPPED})
