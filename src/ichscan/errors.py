"""One error family. Messages name the file and say what to do."""

from __future__ import annotations

import os


class IchscanError(Exception):
    """Base of every error ichscan raises on purpose.

    ``path`` is the file or folder at fault (or None); ``str(err)`` is one line that names it.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NotDicomError(IchscanError):
    """The file is not DICOM (no preamble/meta and nothing pydicom can parse)."""


class NotCTError(IchscanError):
    """A DICOM image of another modality; pass allow_non_ct=True (``--any-modality``) to read it anyway."""


class PixelDataError(IchscanError):
    """Pixel data missing, truncated, undecodable, or of a kind ichscan cannot use (colour)."""


class NoPixelDataError(PixelDataError):
    """A DICOM object with no image (SR, RT plan, DICOMDIR, presentation state...)."""


class ColourImageError(PixelDataError):
    """RGB/YBR/palette images are not CT acquisitions."""


class SeriesError(IchscanError):
    """A series that cannot be assembled (no usable slices, mixed geometry...)."""


class DataError(IchscanError):
    """Labels, indexes and datasets: a CSV or cache that does not say what it should."""


class CheckpointError(IchscanError):
    """A checkpoint or ensemble manifest that cannot be loaded."""


class ChecksumError(CheckpointError):
    """A checkpoint file whose sha256 differs from the one its manifest records (damaged or swapped)."""


class NoBundledModelError(CheckpointError):
    """This install holds no bundled model (``ichscan/bundled/bundled.json``); pass a checkpoint instead."""


class FolderInUseError(IchscanError):
    """Another ichscan process is writing the output folder (it holds ``<folder>/.ichscan.lock``)."""
