"""``PDTForCausalLM``: a frozen causal LM with PDT sidecars attached by forward hooks.

Design decisions:
- The wrapper is an ``nn.Module`` holding ``trunk`` (the user's model, weights
  frozen) and ``sidecar`` (every trainable parameter), like ``PeftModel``.
  Unknown attributes fall through to the trunk (``model.config``, ...).
- Sidecars enter the trunk only through :class:`~pdt_hf.trunk.hooks.SidecarHooks`
  on the real decoder layers; ``unload()`` removes them and returns the bare,
  untouched trunk.
- ``forward`` runs the trunk's decoder stack once, applies the trunk's own
  logit head (``lm_head`` plus any soft-cap or scaling its causal LM applies,
  see ``trunk.architectures.trunk_logits``), so logits are bit-identical to
  the bare trunk's when the sidecar is at init, and reads the heads off the
  last hidden state.
- A PEFT trunk (a ``PeftModel``, or an adapter directory / Hub id given to
  ``from_pretrained``) is served through its transformers model with the
  adapter layers inside (``trunk.peft``); the adapter is frozen with the rest
  and recorded in ``PDTConfig.trunk_adapter`` so the trunk can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .checkpoint import load_sidecar_weights, save_sidecar
from .config import PDTConfig
from .generation.api import multi_stream_generate, register_owner
from .sidecars.context import DenseNotes, PackedNotes, SidecarContext
from .sidecars.heads.layer import masked_mean
from .sidecars.model import PDTSidecar
from .trunk.architectures import base_model, check_trunk, trunk_dims, trunk_logits
from .trunk.compat import cache_kwargs, enable_checkpointing, output_cache, pop_cache_arg
from .trunk.hooks import SidecarHooks
from .trunk.loading import load_tokenizer, load_trunk
from .trunk.peft import find_adapter, is_peft_model, load_peft_trunk, reload_peft_trunk, unwrap_peft
from .trunk.quantized import pin_4bit_layout


@dataclass
class PDTOutput(ModelOutput):
    """Output of :meth:`PDTForCausalLM.forward`.

    ``logits`` ``[N, T, V]``; ``hidden_states`` last hidden state ``[N, T, d]``; ``note`` notes-head summary
    of the (masked) sequence ``[N, d_note]``; ``speculated_note`` ``[N, d_note]``; ``planner_note``
    ``[N, d_note]``; ``coverage_logits`` ``[N, P]`` when ``plan_notes`` is given; ``agreement_logits`` ``[N]``;
    ``cache`` the trunk's cache (transformers 5.24 naming; ``past_key_values`` reads it too).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    cache: object | None = None
    note: torch.Tensor | None = None
    speculated_note: torch.Tensor | None = None
    planner_note: torch.Tensor | None = None
    coverage_logits: torch.Tensor | None = None
    agreement_logits: torch.Tensor | None = None


if not isinstance(getattr(ModelOutput, "past_key_values", None), property):
    # transformers < 5.24 has no ``past_key_values`` alias on ModelOutput; keep the old attribute readable there.
    PDTOutput.past_key_values = property(lambda self: self.cache)


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, :-1]`` predict ``labels[:, 1:]``; label -100 is ignored."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


class PDTForCausalLM(nn.Module):
    """A frozen causal LM plus PDT sidecars (adapters, SNC, heads)."""

    def __init__(self, trunk: PreTrainedModel, config: PDTConfig | None = None) -> None:
        super().__init__()
        config, peft_model = config or PDTConfig(), None
        if is_peft_model(trunk):
            peft_model, (trunk, record) = trunk, unwrap_peft(trunk)
            if config.trunk_adapter is None:
                config = dataclasses.replace(config, trunk_adapter=record)
        check_trunk(trunk)
        config = config.resolve(trunk.config)
        hidden_size, _ = trunk_dims(trunk.config)
        self.trunk = trunk
        self.pdt_config = config
        # Sidecars take the trunk's compute dtype (a 4-bit trunk's packed weights are not floating point).
        dtype = getattr(trunk, "dtype", torch.float32)
        dtype = dtype if dtype.is_floating_point else torch.float32
        device = trunk.get_input_embeddings().weight.device
        self.sidecar = PDTSidecar(config, hidden_size).to(device=device, dtype=dtype)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        pin_4bit_layout(trunk)  # bitsandbytes' CPU inference path would rewrite 4-bit layers and stop gradients
        self.hooks = SidecarHooks(trunk, self.sidecar, config.instrumented_layers).attach()
        self.tokenizer = None
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: the trunk already is
        register_owner(trunk, self)

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_pretrained(
        cls,
        trunk_or_id: PreTrainedModel | str | os.PathLike | None = None,
        sidecar: str | os.PathLike | None = None,
        config: PDTConfig | None = None,
        *,
        revision: str | None = None,
        merge_adapter: bool | None = None,
        **trunk_kwargs: object,
    ) -> PDTForCausalLM:
        """Attach sidecars to a trunk.

        Args:
            trunk_or_id: a loaded model (e.g. 4-bit, or a ``peft.PeftModel``), a Hub id, a local path, a PEFT
                adapter (a directory or Hub id with ``adapter_config.json``: its base is loaded, then the adapter),
                or None for the embedded SmolLM2 (or, when ``sidecar`` is given, the trunk its ``pdt_config.json``
                names, PEFT adapter included).
            sidecar: directory written by :meth:`save_pretrained`; its config and weights are loaded.
            config: a fresh :class:`PDTConfig` (ignored when ``sidecar`` is given).
            merge_adapter: merge a PEFT adapter loaded here into the trunk's weights (``merge_and_unload``);
                None: as the sidecar recorded, else False.
            trunk_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``torch_dtype``, ...).
        """
        adapter = None
        if sidecar is not None:
            config = PDTConfig.from_pretrained(sidecar)
            if trunk_or_id is None:
                trunk_or_id = config.base_model_name_or_path
                revision = revision or config.revision
                adapter = config.trunk_adapter
        tokenizer, record = None, None
        if isinstance(trunk_or_id, PreTrainedModel) or is_peft_model(trunk_or_id):
            trunk, name = trunk_or_id, getattr(trunk_or_id, "name_or_path", None)
        elif adapter is not None or find_adapter(trunk_or_id, revision) is not None:
            recorded = (config.trunk_adapter if config is not None else None) or {}
            merge = merge_adapter if merge_adapter is not None else bool(recorded.get("merged", False))
            if adapter is not None:  # rebuild the trunk the sidecar recorded: its base, then its adapter
                loaded = reload_peft_trunk(
                    adapter, trunk_or_id, revision, merge=merge, sidecar=sidecar, **trunk_kwargs
                )
            else:
                loaded = load_peft_trunk(trunk_or_id, revision=revision, merge=merge, **trunk_kwargs)
            trunk, name, revision, record = loaded.trunk, loaded.base_name, loaded.base_revision, loaded.record
            tokenizer = load_tokenizer(loaded.tokenizer_source)
        else:
            trunk, name = load_trunk(trunk_or_id, revision=revision, **trunk_kwargs)
            tokenizer = load_tokenizer(trunk_or_id, revision=revision) if trunk_or_id is not None else load_tokenizer()
        config = config or PDTConfig()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = name
            config.revision = revision
        if record is not None:
            config.trunk_adapter = record
        model = cls(trunk, config)
        model.tokenizer = tokenizer
        if sidecar is not None:
            model.load_sidecar(sidecar)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``pdt_config.json`` and ``sidecar.safetensors`` (sidecar weights only) atomically."""
        save_sidecar(save_directory, self.pdt_config.to_json_string(), self.sidecar.state_dict())

    def load_sidecar(self, directory: str | os.PathLike, add_synthesis: bool = False) -> None:
        """Load sidecar weights saved for this trunk; a fingerprint mismatch names the differing field.

        ``add_synthesis``: this sidecar has a synthesis slot (``PDTConfig.synthesis``) and ``directory`` may hold
        one saved without it; the slot then keeps its fresh (identity) initialisation, every other tensor is
        loaded (how the curriculum's synthesis stage starts from a trained sidecar, ``train.init_sidecar``).
        """
        saved = PDTConfig.from_pretrained(directory)
        saved.resolve(self.trunk.config)
        expected = self.sidecar.state_dict()
        if add_synthesis and not saved.synthesis:
            expected = {k: v for k, v in expected.items() if ".synthesis_" not in k}
        tensors = load_sidecar_weights(directory, expected)
        self.sidecar.load_state_dict(tensors, strict=len(expected) == len(self.sidecar.state_dict()))

    # ------------------------------------------------------------------ sidecar switching
    def unload(self) -> PreTrainedModel:
        """Remove the hooks for good and return the bare trunk (weights untouched; a ``PeftModel`` if one was given)."""
        self.hooks.detach()
        self.sidecar.context = None
        return self.peft_model if self.peft_model is not None else self.trunk

    @contextmanager
    def disable_sidecars(self) -> Iterator[None]:
        """Run the bare trunk inside the block (like ``PeftModel.disable_adapter``)."""
        with self.hooks.detached():
            yield

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable the trunk's checkpointing; non-reentrant by default so sidecar grads flow past frozen inputs."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        enable_checkpointing(self.trunk, kwargs)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "trunk":
                raise
            return getattr(self.trunk, name)

    # ------------------------------------------------------------------ forward
    def set_context(
        self,
        stream_ids: torch.Tensor | None,
        batch_size: int,
        notes: DenseNotes | PackedNotes | None,
        device: torch.device,
        token_mask: torch.Tensor | None = None,
    ) -> SidecarContext:
        """Install the per-call context the hooks read (kept until the next call; see ``sidecars.context``)."""
        if stream_ids is None:
            stream_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        stream_ids = torch.as_tensor(stream_ids, dtype=torch.long, device=device)
        if stream_ids.ndim != 1 or stream_ids.shape[0] != batch_size:
            raise ValueError(f"stream_ids must have shape [{batch_size}], got {tuple(stream_ids.shape)}.")
        slots = self.pdt_config.num_streams + int(self.pdt_config.synthesis)
        if stream_ids.numel() and (int(stream_ids.min()) < 0 or int(stream_ids.max()) >= slots):
            extra = f", and {slots - 1} for the synthesis stream" if self.pdt_config.synthesis else ""
            raise ValueError(
                f"stream_ids {stream_ids.tolist()} out of range: this sidecar has num_streams="
                f"{self.pdt_config.num_streams} (ids 0..{self.pdt_config.num_streams - 1}{extra})."
            )
        self.sidecar.context = SidecarContext(stream_ids=stream_ids, notes=notes, token_mask=token_mask)
        return self.sidecar.context

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stream_ids: torch.Tensor | None = None,
        notes: DenseNotes | PackedNotes | None = None,
        labels: torch.Tensor | None = None,
        plan_notes: torch.Tensor | None = None,
        sidecar_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        compute_heads: bool = True,
        **kwargs: object,
    ) -> PDTOutput:
        """Trunk forward with sidecars.

        Args:
            input_ids: ``[N, T]``; stream_ids: ``[N]`` stream of each row (default: all 0);
            notes: the notes each row may read (:class:`DenseNotes` or :class:`PackedNotes`), or None;
            labels: ``[N, T]`` LM labels (shifted inside, -100 ignored); plan_notes: ``[N, P, d_note]``;
            sidecar_mask: ``[N, T]`` bool, sidecar deltas apply only where true (e.g. not on the shared prompt).
            cache: the trunk cache (``past_key_values=`` is taken too, as by transformers' forwards).
            compute_heads: False skips the heads (the decode loop calls them itself, once per block).
        """
        cache = pop_cache_arg(cache, kwargs)
        ref = input_ids if input_ids is not None else inputs_embeds
        self.set_context(stream_ids, ref.shape[0], notes, ref.device, sidecar_mask)
        if use_cache is None:
            # A cache built during a checkpointed training forward would be updated again by the recompute.
            use_cache = cache is not None
        outputs = base_model(self.trunk)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # [N, T, d]
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = trunk_logits(self.trunk, hidden[:, keep])  # [N, T', V]
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        if not compute_heads:
            return PDTOutput(loss=loss, logits=logits, hidden_states=hidden, cache=output_cache(outputs))

        heads = self.sidecar.heads
        mask = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None
        ctx = self.sidecar.context
        note = heads.notes(hidden, mask)
        pooled = masked_mean(hidden, mask)
        coverage_logits = heads.coverage(note, plan_notes) if plan_notes is not None else None
        # The agreement head reads the coverage of the row's own plan item (item k for stream k), as in decoding.
        own_coverage = note.new_zeros(note.shape[0])
        if coverage_logits is not None:
            item = ctx.stream_ids.clamp(max=coverage_logits.shape[-1] - 1)
            own_coverage = coverage_logits.sigmoid().gather(-1, item[:, None]).squeeze(-1)
        if isinstance(notes, DenseNotes):
            _, valid, _ = notes.resolved(1)
            w = valid.to(notes.notes.dtype).unsqueeze(-1)  # [N, M, 1]
            summary = (notes.notes * w).sum(1) / w.sum(1).clamp(min=1.0)
        else:
            summary = torch.zeros_like(note)
        return PDTOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden,
            cache=output_cache(outputs),
            note=note,
            speculated_note=heads.speculation(note),
            planner_note=self._planner_notes(hidden, mask, ctx.stream_ids),
            coverage_logits=coverage_logits,
            agreement_logits=heads.agreement(pooled, summary, own_coverage, note),
        )

    def _planner_notes(self, hidden: torch.Tensor, mask: torch.Tensor | None, streams: torch.Tensor) -> torch.Tensor:
        """Planner notes ``[N, d_note]``; zeros for rows of the synthesis stream, which has no plan item."""
        k = self.pdt_config.num_streams
        notes = self.sidecar.heads.planner(hidden, mask, streams.clamp(max=k - 1))
        return torch.where((streams < k)[:, None], notes, torch.zeros_like(notes))

    # ------------------------------------------------------------------ generation
    generate = multi_stream_generate

    # ------------------------------------------------------------------ accounting
    def sidecar_budget(self) -> dict[str, float]:
        """Parameter counts of the sidecar and trunk and the sidecar's share of the trunk."""
        return parameter_budget(self.sidecar, self.trunk)


def parameter_budget(sidecar: nn.Module, trunk: nn.Module) -> dict[str, float]:
    families = {name: sum(p.numel() for p in module.parameters()) for name, module in sidecar.named_children()}
    total = sum(families.values())
    trunk_params = sum(p.numel() for p in trunk.parameters())
    return {"sidecar": total, "trunk": trunk_params, "share": total / trunk_params, **families}
