"""The model shipped inside ichscan: ``bundled.json`` (an ensemble manifest with sha256 per member,
operating points, ``trained_on`` and provenance) and its members ``member<i>.safetensors`` + ``.json``.

Trained on synthetic phantoms only. ``ichscan predict STUDY --out DIR`` uses it when no ``--checkpoint``
is given (or ``--checkpoint bundled``). ``ichscan.model`` reads and checks it (``bundled_checkpoint``,
``read_manifest``); ``python -m ichscan.bundled.make`` writes it (``ichscan.model.write_bundle``).
"""

# What `--replay auto` draws when adapting the bundled model to a site (docs/training.md#site): phantoms of the
# plan the bundle's last stage drew its own with (the generator's arguments recorded in bundled.json's recipe),
# 100 studies of a seed no stage used, drawn by the generator as it now is. Rehearsed beside a site's series, they keep what the site's few positives cannot
# teach (measured by cross-validation on ctich-dev under the rule of commit 3b81076).
REPLAY_PHANTOMS = {
    "studies": 100,
    "seed": 1013,
    "size": 256,
    "slices": (24, 40),
    "thickness": (2.5, 8.0),
    "prevalence": {"any": 0.85, "epidural": 0.3, "intraparenchymal": 0.3, "intraventricular": 0.3,
                   "subarachnoid": 0.3, "subdural": 0.3},
    "twins": 0.7,
    "export": 0.5,
    "randomize_outside": 0.5,
    "outside_margin": (25.0, 40.0),
    "fractures": 0.3,
    "calcification": 0.5,
}
