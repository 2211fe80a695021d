"""The method registry: CorrCLIP, SC-CLIP and CLIPtrase, each declared in its own module.

    from corrclip import methods
    methods.names()                      # ["corrclip", "sc-clip", "cliptrase"]
    m = methods.get("sc-clip")
    m.settings("voc21"), m.uses_regions, m.graphs(models, 224)

A new method is one module that builds a `Method` and calls `register` (tests may register one
of their own); the API, the exporter, the CLI and bench read the registry.
"""

# Each module registers itself; import order is the order the CLI lists them.
from . import corrclip  # noqa: I001, F401
from . import scclip  # noqa: F401
from . import cliptrase  # noqa: F401
from .base import Encoder, Method, build_models, get, names, register, unregister

__all__ = ["Encoder", "Method", "build_models", "get", "names", "register", "unregister"]
