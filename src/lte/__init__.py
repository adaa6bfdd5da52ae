"""lte: Learn To be Efficient — structured activation sparsity for Hugging Face models.

    import lte
    lmodel = lte.get_lte_model(hf_model, lte.LTEConfig(eta=0.5))
    lmodel.set_routing("soft")  # stage 1; "hard" for stage 2 and inference
    lmodel.save_pretrained("out"); lte.load_model("out")  # any model lte saved, or a plain HF one
    lte.add_adapters(lmodel, peft.LoraConfig(r=16))  # LoRA on a frozen base (pip install 'lte[peft]')
"""

from .config import LTEConfig
from .conversion import architectures
from .conversion.architectures import FFNSpec, register_architecture
from .errors import LTEError
from .loading import load_model
from .model import LTEModel, add_adapters, get_lte_model
from .version import __version__

__all__ = [
    "FFNSpec",
    "LTEConfig",
    "LTEError",
    "LTEModel",
    "add_adapters",
    "architectures",
    "get_lte_model",
    "load_model",
    "register_architecture",
    "__version__",
]
