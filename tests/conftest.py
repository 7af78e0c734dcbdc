"""Shared fixtures: real DICOM files shipped by pydicom / pydicom-data, and a writer for quirky CT files."""

from __future__ import annotations

import pytest


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
