"""Build shim: everything is declared in pyproject.toml; this only keeps assets/*.py out of the wheel.

`webui.assets` is the repository's assets/ folder shipped as package data, and setuptools puts every .py file of
a listed package into the wheel, here the development scripts that draw the diagram and take screenshots
(make_diagram.py, make_screenshots.py, zerogpu_cost.py). pyproject.toml has no setting that drops a package's
modules, so this build step does. tests/test_packaging.py checks the wheel holds exactly what the app needs.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_ONLY_PACKAGES = {"webui.assets"}


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        if package in DATA_ONLY_PACKAGES:
            return []
        return super().find_package_modules(package, package_dir)


setup(cmdclass={"build_py": BuildPy})
