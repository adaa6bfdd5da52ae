"""lte: Learn To be Efficient — structured activation sparsity for Hugging Face models.

    import lte
    lmodel = lte.get_lte_model(hf_model, lte.LTEConfig(eta=0.5))
    lmodel.set_routing("soft")  # stage 1; "hard" for stage 2 and inference
"""

__version__ = "0.1.0"

from .config import LTEConfig  # noqa: E402
from .conversion import architectures  # noqa: E402
from .conversion.architectures import FFNSpec, register_architecture  # noqa: E402
from .errors import LTEError  # noqa: E402
from .model import LTEModel, get_lte_model  # noqa: E402

__all__ = [
    "FFNSpec",
    "LTEConfig",
    "LTEError",
    "LTEModel",
    "architectures",
    "get_lte_model",
    "register_architecture",
    "__version__",
]
