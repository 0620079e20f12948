"""The networks. Importing this package fills the architecture registry (timm's way): each
architecture module registers itself, and ``registry`` imports none of them.

    from model.nets.registry import create_model
    net = create_model("effnet-lite", {"variant": "lite0"})
"""
from . import effnet_lite, plainvit  # noqa: F401  (they register "effnet-lite" and "plainvit")
