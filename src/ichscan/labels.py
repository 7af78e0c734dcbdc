"""The one place the label order and the loss weights live.

ichscan's order puts ``any`` first, as the paper's Table 1 does. The RSNA CSV lists ``any`` last;
code that reads or writes RSNA files maps by name, never by position.
"""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES: tuple[str, ...] = LABELS[1:]

# RSNA 2019 weighted multi-label log loss: `any` counts twice.
LOSS_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)

# Order of the label suffixes in RSNA's stage_2_train.csv, kept for writing files that look like it.
RSNA_CSV_ORDER: tuple[str, ...] = SUBTYPES + ("any",)


def loss_weights(labels: tuple[str, ...] = LABELS) -> tuple[float, ...]:
    """RSNA weights for any label order: 2 for `any`, 1 for the others."""
    return tuple(2.0 if name == "any" else 1.0 for name in labels)
