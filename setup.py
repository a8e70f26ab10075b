"""Packaging for umig.

The Python package is ordinary; the one special step is the freestanding C restorer
(restorer/), which is compiled with the system compiler while the package is built and
shipped inside it as umig/bin/umig-restorer:

* a regular build (pip install ., a wheel) builds it into the build tree, so it lands in
  the installed package;
* an editable build (pip install -e .) builds it into this source tree's
  umig/bin/umig-restorer, where the editable package looks for it.
"""

import os
import re
import shlex
import subprocess

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
RESTORER_SRC = os.path.join(HERE, "restorer")
RESTORER_IN_PACKAGE = os.path.join("umig", "bin", "umig-restorer")


def read_version():
    with open(os.path.join(HERE, "umig", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if not match:
        raise RuntimeError("umig/__init__.py has no __version__")
    return match.group(1)


def build_restorer(output):
    """Run the restorer's own Makefile, writing the binary to `output`."""
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    cmd = shlex.split(os.environ.get("MAKE", "make")) + [
        "-C", RESTORER_SRC, "OUTPUT=" + output,
    ]
    print("building the restorer: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.check_call(cmd)
    if not os.access(output, os.X_OK):
        raise RuntimeError("restorer build did not produce an executable " + output)


class BuildPyWithRestorer(build_py):
    def run(self):
        if self.editable_mode:
            # The editable package is the source tree itself: build the binary there,
            # before build_py looks for package data.
            build_restorer(os.path.join(HERE, RESTORER_IN_PACKAGE))
            super().run()
        else:
            # Copy the Python files first, then build the binary straight into the build
            # tree (so a stale copy left in the source tree by an editable build never
            # wins).
            super().run()
            build_restorer(os.path.join(self.build_lib, RESTORER_IN_PACKAGE))

    def get_outputs(self, include_bytecode=1):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            binary = os.path.join(self.build_lib, RESTORER_IN_PACKAGE)
            if binary not in outputs:
                outputs.append(binary)
        return outputs


class BinaryDistribution(Distribution):
    """Not pure Python (it ships a native executable): build into the platform-specific
    build tree and install into platlib."""

    def has_ext_modules(self):
        return True


cmdclass = {"build_py": BuildPyWithRestorer}

try:  # setuptools >= 70.1 has its own bdist_wheel; older ones use the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel
    except ImportError:
        _bdist_wheel = None

if _bdist_wheel is not None:
    class BdistWheelPlatform(_bdist_wheel):
        """The wheel carries a native binary but no Python extension: any Python 3,
        this platform only (py3-none-linux_*)."""

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = BdistWheelPlatform


setup(
    name="umig",
    version=read_version(),
    description="Userspace process migration for Linux: freeze, ship and resume a running process",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["umig", "umig.*"]),
    package_data={"umig": ["bin/umig-restorer"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "python-ptrace",
        "psutil",
        "msgpack",
        "pyzmq",
        "lz4",
        "zstandard",
        "xxhash",
    ],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": ["umig = umig.cli:main"],
    },
    cmdclass=cmdclass,
    distclass=BinaryDistribution,
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: C",
    ],
)
