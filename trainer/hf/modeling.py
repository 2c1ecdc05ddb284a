"""The ``transformers`` model of a longhorn-zoo LM: any installed mixer, with recurrent-state generation.

``LonghornZooForCausalLM`` holds our :class:`longhorn_zoo.model.LM` as ``self.model``, built
from the config by the mixer's plugin (a hybrid stack: by each of its mixers'), so a third-party mixer
works as the built-in ones do.
``generate()`` decodes the way ``longhorn_zoo.generate`` does: the prompt goes through the
parallel form, which returns every layer's state, and each new token through the mixers'
``step``. State-space and linear-attention mixers carry a state of constant size per
sequence; Llama's state is its KV cache. The state travels between steps as the model keyword
``recurrent_state`` (a :class:`RecurrentState`), outside ``transformers``' own ``Cache`` classes.

Padding: a recurrent state would read pad tokens on the left as if they were text, so a
batch whose ``attention_mask`` has a 0 before a 1 is refused; pad on the right (the logits
of the real tokens are then exact) or decode one sequence at a time. Beam search, which
would need the state reordered, is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from longhorn_zoo.hf.configuration import LonghornZooConfig
from longhorn_zoo.model import LM
from longhorn_zoo.model_folder import build_lm


class RecurrentState:
    """Every layer's state after the tokens seen so far (what ``LM.forward(..., return_states=True)`` gives)."""

    def __init__(self, states: list[Any]) -> None:
        self.states = states


@dataclass
class CausalLMOutputWithState(ModelOutput):
    """Logits (B, T, vocab), the loss when labels were given, and the state to continue from."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    recurrent_state: RecurrentState | None = None


def check_padding(attention_mask: Tensor | None) -> None:
    """Raise ValueError if any row of ``attention_mask`` has a masked position before a kept one."""
    if attention_mask is None:
        return
    keep = attention_mask.bool()
    if (keep & ~keep.cummin(dim=1).values).any():
        raise ValueError("attention_mask has padding before text (left padding): the mixers' recurrent state would "
                         "read the pad tokens. Pad on the right, or pass one sequence at a time (batch size 1)")


class LonghornZooForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM over any longhorn-zoo mixer; ``self.model`` is our :class:`~longhorn_zoo.model.LM`."""

    config_class = LonghornZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted decoding: the state cannot be rolled back
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}  # with tie_word_embeddings

    def __init__(self, config: LonghornZooConfig) -> None:
        super().__init__(config)
        self.model: LM = build_lm(config.to_dict())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a KV-cache object: the mixers keep their own state

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise the LM as the trainer does, then put back what ``from_pretrained`` loaded.

        ``transformers`` initialises module by module and skips those whose own tensors were
        loaded; our mixers initialise as a whole (``init_weights``), which also fills the buffers
        no file holds (non-persistent ones such as Llama's RoPE table). The loaded tensors are
        those ``transformers`` marks ``_is_hf_initialized``; they are copied aside meanwhile.
        """
        loaded = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()
                  if getattr(v, "_is_hf_initialized", False)}
        self.model.init_weights()
        current = self.model.state_dict()
        for k, v in loaded.items():
            current[k].copy_(v)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.output

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.output = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                recurrent_state: RecurrentState | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithState | tuple:
        """Logits for ``input_ids`` (B, T); with ``use_cache``, also the state after them.

        ``recurrent_state`` continues a sequence: one new token goes through the mixers' ``step``,
        several through the parallel form from that state. ``labels`` (B, T), -100 where not
        scored, give the mean next-token cross-entropy as ``loss``.
        """
        check_padding(attention_mask)
        state = None
        if use_cache or recurrent_state is not None:
            previous = None if recurrent_state is None else recurrent_state.states
            if previous is not None and input_ids.shape[1] == 1:
                logits, states = self.model.step(input_ids[:, 0], previous)
                logits = logits.unsqueeze(1)
            else:
                logits, states = self.model(input_ids, previous, return_states=True)
            state = RecurrentState(states)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithState(loss=loss, logits=logits, recurrent_state=state)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, recurrent_state: RecurrentState | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict[str, Any]:
        """The whole prompt first; then only the newest token, with the state."""
        if recurrent_state is not None and use_cache:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "recurrent_state": recurrent_state if use_cache else None,
                "attention_mask": attention_mask, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any],
                                            *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["recurrent_state"] = outputs.get("recurrent_state")
        return model_kwargs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``; beam search is refused (the recurrent state is not reordered)."""
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1) > 1:
            raise ValueError("beam search (num_beams > 1) is not supported: the mixers' recurrent state is not "
                             "reordered between beams. Use greedy decoding or sampling")
        return super().generate(*args, **kwargs)
