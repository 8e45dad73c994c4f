"""The data tests keep their cache (shard indexes, the built-in corpus) in a temporary folder."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package", autouse=True)
def data_cache(tmp_path_factory):
    """``LCL_FAST_CACHE`` for the data tests: a package-wide temporary folder (never ``~/.cache``)."""
    folder = tmp_path_factory.mktemp("data_cache")
    old = os.environ.get("LCL_FAST_CACHE")
    os.environ["LCL_FAST_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LCL_FAST_CACHE", None)
    else:
        os.environ["LCL_FAST_CACHE"] = old
