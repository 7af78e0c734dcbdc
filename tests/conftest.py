"""Shared fixtures: real DICOM files shipped by pydicom / pydicom-data, and a writer for quirky CT files."""

from __future__ import annotations

import os

import pytest

# `make test` runs the suite in several processes (pytest-xdist). Each gets its share of the cores for torch's and
# numpy's thread pools, set here before any test module imports torch, so that the processes do not fight over
# the cores (on 2 cores: two processes of one thread each, 310 s, against 580 s for one process of two threads).
# A value the user set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from ichscan.hardware import cpu_count  # no torch import

    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, cpu_count() // _WORKERS)))


@pytest.fixture
def testdata():
    """``testdata("693_UNCR.dcm")`` -> path of a file shipped with pydicom or pydicom-data (skip if absent)."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"{name} not available (install pydicom-data)")
        return str(path)

    return get


@pytest.fixture(autouse=True, scope="session")
def _site_key(tmp_path_factory):
    """Outputs carry pseudonymous patient keys made with a site key: the tests' own, never the user's."""
    import os

    os.environ["ICHSCAN_KEY_FILE"] = str(tmp_path_factory.mktemp("site") / "patient.key")
    yield
