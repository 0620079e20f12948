"""ls-clickseg model package: pure PyTorch click-based segmentation.

Public entry points:
- ``model.registry.create_model`` / ``list_models``: the architecture factory.
- ``model.checkpoint.save_checkpoint`` / ``load_checkpoint``: self-describing, safe checkpoints.
- ``model.predictor.ClickSegPredictor``: clicks -> probability map, with CFR.
- ``python -m model.evaluate`` / ``python -m model.benchmark`` / ``python -m model.train``.
"""

# The architectures register themselves when imported (timm's way): importing any part of the
# package fills the registry, and ``registry`` itself imports no architecture.
from . import effnet_lite, plainvit  # noqa: E402,F401
