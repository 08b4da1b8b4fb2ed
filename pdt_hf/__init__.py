"""pdt-hf: Parallel Decoder Transformer sidecars for frozen Hugging Face causal LMs."""

from .config import PDTConfig
from .modeling import PDTForCausalLM, PDTOutput
from .sidecars.context import DenseNotes, PackedNotes, SidecarContext
from .trunk.architectures import ARCHITECTURES, UnsupportedTrunkError

__all__ = [
    "ARCHITECTURES",
    "DenseNotes",
    "PDTConfig",
    "PDTForCausalLM",
    "PDTOutput",
    "PackedNotes",
    "SidecarContext",
    "UnsupportedTrunkError",
]
__version__ = "0.1.0"
