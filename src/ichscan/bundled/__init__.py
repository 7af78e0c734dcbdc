"""The model shipped inside ichscan: ``bundled.json`` (an ensemble manifest with sha256 per member,
operating points, ``trained_on`` and provenance) and its members ``member<i>.safetensors`` + ``.json``.

Trained on synthetic phantoms only. ``ichscan predict STUDY --out DIR`` uses it when no ``--checkpoint``
is given (or ``--checkpoint bundled``). ``ichscan.model`` reads and checks it (``bundled_checkpoint``,
``read_manifest``); ``python -m ichscan.bundled.make`` writes it (``ichscan.model.write_bundle``).
"""
