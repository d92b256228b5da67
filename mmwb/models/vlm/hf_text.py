"""Any transformers causal LM as a VLM's language model: the same ``forward`` and StepModel protocol as mmwb's
decoder, so the VLM and ``mmwb.models.decoder.generate`` drive both alike."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.initialization import no_init_weights


class TransformersCausalLM(nn.Module):
    """Wraps ``model`` (an ``AutoModelForCausalLM``); its cache is transformers' DynamicCache."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self._cache_kwarg = cache_kwarg(model)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformersCausalLM:
        config = dict(config)
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
        with no_init_weights():  # the checkpoint overwrites every weight: skip minutes of random init at 7B
            return cls(AutoModelForCausalLM.from_config(hf_config))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ):
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )

    def allocate_cache(self, batch_size: int, max_length: int) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor | None,
        *,
        cache: DynamicCache,
        cache_position: int,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:  # nothing padded: every cached slot and the new ones are visible
            attention_mask = torch.ones(ref.shape[0], cache_position + ref.shape[1], device=ref.device)
        out = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float()

    def reorder_cache(self, cache: DynamicCache, beam_idx: torch.Tensor) -> DynamicCache:
        cache.reorder_cache(beam_idx)
        return cache


def cache_kwarg(model: PreTrainedModel) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` still works until 5.40, with a FutureWarning on every call), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
