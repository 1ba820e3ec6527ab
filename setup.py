"""The compiled part of flatd: the combine and pixel kernels (flatd/stack/_kernels.c).

Everything else is in pyproject.toml. Building needs a C compiler and the Python headers
(`make deps` installs them on Debian). -ffp-contract=off: no fused multiply-add, so that
the kernels equal the references operation for operation; -fno-trapping-math lets gcc
turn branches into vector selects (flatd never reads the floating-point exception flags)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "flatd.stack._kernels",
    sources=["flatd/stack/_kernels.c"],
    depends=["flatd/stack/_kernels_body.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99"],
    libraries=["m"],
)])
