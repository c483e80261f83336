"""Ships csrc/ inside the package so that an installed wheel can JIT-build its kernels.

Everything else is in pyproject.toml; editable installs read csrc/ from the checkout.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        if os.path.isdir("csrc"):
            self.copy_tree("csrc", os.path.join(self.build_lib, "twa_kernels", "csrc"))


setup(cmdclass={"build_py": BuildPyWithSources})
