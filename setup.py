"""The optional C parser; everything else is in pyproject.toml.

``optional=True``: on a machine without a C compiler flowray installs without it and
parses with Arrow and Python (flowray.ingest.fastparse falls back), only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flowray.ingest._native",
            ["flowray/ingest/_native.c"],
            # Generated from flowray/ingest/rules.py: a change to it rebuilds the parser.
            depends=["flowray/ingest/_rules.h"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
