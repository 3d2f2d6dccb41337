"""Builds the one native piece: the per-instruction trap hook (src/nestvisor/cpu/_trap.c)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nestvisor.cpu._trap",
            sources=["src/nestvisor/cpu/_trap.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
