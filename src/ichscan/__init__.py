"""ichscan: intracranial hemorrhage detection and classification on head CT.

Research software, not a medical device. The package is importable without torch:
ingest (``ichscan.dicom``, ``ichscan.windows``) is numpy only.
"""

from ichscan.errors import IchscanError
from ichscan.labels import LABELS, LOSS_WEIGHTS, SUBTYPES

__version__ = "0.1.0"
__all__ = ["IchscanError", "LABELS", "LOSS_WEIGHTS", "SUBTYPES", "__version__"]
