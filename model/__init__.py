"""ls-clickseg model package: pure PyTorch click-based segmentation (no Flask, no Label Studio).

- ``nets``: the registry and the networks (``nets.registry.create_model``).
- ``checkpoint``: self-describing, safe checkpoints (``save_checkpoint`` / ``load_checkpoint``).
- ``predictor``: clicks -> probability map, with CFR and zoom-in; ``proposals``: recall -> proposals.
- ``transforms``, ``clicks``, ``boxes``, ``data``: coordinates and views, clicks, boxes, datasets.
- ``training``: ``python -m model.training.train`` (and ``.recall``, ``.pack``, ``.fast_train``).
- ``evaluation``: ``python -m model.evaluation.evaluate`` (and ``.suite``, ``.benchmark``, ``.evaluate_mois``).
"""
from . import nets  # noqa: F401  (fills the architecture registry)
