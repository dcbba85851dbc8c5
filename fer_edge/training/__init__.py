"""Training: recipes (``recipes``), GPU-side augmentation (``augment``), the
resumable, torchrun-ready loop (``trainer``) and the ``train`` / ``eval``
commands (``command``).  Nothing is imported here: the CLI builds its parsers
without importing torch (a device has no torch)."""
