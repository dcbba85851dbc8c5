"""Training: recipes (``recipes``), GPU-side augmentation (``augment``),
distillation (``distill``), the run's settings (``settings``, ``setup``), the
model it starts from (``finetune``), precision and optimizer (``optim``),
processes (``distributed``), the epoch (``loop``), the run folder
(``rundir``) and the resumable, torchrun-ready run (``trainer``).  The
commands are in ``fer_edge.commands``.  Nothing is imported here: the CLI
builds its parsers without importing torch (a device has no torch)."""
