"""Shared set-up of the trainer tests: one synthetic corpus per session, one CPU thread per process.

One thread because these runs are tiny and the test machine is shared: a second OpenMP thread
fighting other processes for two cores makes a step several times slower, never faster.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """``LCL_FAST_CACHE`` pointing at a session folder holding the built-in corpus (built once)."""
    from lcl_fast.data.synthetic import ensure_corpus

    folder = tmp_path_factory.mktemp("lcl_cache")
    old = os.environ.get("LCL_FAST_CACHE")
    os.environ["LCL_FAST_CACHE"] = str(folder)
    ensure_corpus()
    yield folder
    if old is None:
        os.environ.pop("LCL_FAST_CACHE", None)
    else:
        os.environ["LCL_FAST_CACHE"] = old


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_env(corpus_cache, one_thread, tmp_path):
    """Everything an in-process ``lcl_fast.train.main`` call needs; returns the logs folder."""
    return tmp_path / "logs"
