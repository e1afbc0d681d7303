"""The package list, which pyproject.toml cannot declare (its ``packages`` is either a list or a ``find``, not both):
every ``tokenweave*`` package found in the tree, plus ``tokenweave.launch_configs``, the top-level ``launch/`` folder
mapped into the package (``[tool.setuptools.package-dir]`` in pyproject.toml). So the accelerate configs have one
copy in the repository, ``launch/*.yaml``, and the wheel ships them as ``tokenweave/launch_configs/*.yaml``, where
``tokenweave.launch`` finds them by name. Everything else about the build is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["tokenweave*"]), "tokenweave.launch_configs"])
