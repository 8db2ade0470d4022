"""The one thing pyproject.toml cannot say: the repository's ``conf/`` ships inside the package as ``pretune/conf/``
(every YAML in it), where Hydra's ``pkg://pretune.conf`` finds it once installed; ``conf/`` stays at the repository
root. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Hydra's ``pkg://`` search path takes a regular package only: the built ``pretune/conf/`` gets an
    ``__init__.py`` (the repository's ``conf/`` holds configs alone)."""

    def run(self):
        super().run()
        init = Path(self.build_lib) / "pretune" / "conf" / "__init__.py"
        if init.parent.is_dir():
            init.write_text('"""pretune\'s shipped configs, one folder per group (Hydra: pkg://pretune.conf)."""\n')


setup(
    packages=[*find_packages(include=["lightning_modules*", "datamodules*", "pretune*"]), "pretune.conf"],
    package_dir={"pretune.conf": "conf"},
    package_data={"pretune.conf": ["**/*.yaml"]},
    include_package_data=False,
    cmdclass={"build_py": BuildPy},
)
