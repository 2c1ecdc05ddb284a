"""The ``transformers`` config of a longhorn-zoo model: the fields of an exported ``config.json``."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from longhorn_zoo.model_folder import MODEL_TYPE


class LonghornZooConfig(PretrainedConfig):
    """A longhorn-zoo LM: the mixer (any installed plugin's) and its options, or a hybrid stack, and the sizes.

    Args:
        mixer: Mixer plugin name, e.g. "longhorn" (``python -m longhorn_zoo.registry`` lists them); for a
            hybrid stack the names of its mixers joined by ``+`` (informative: ``pattern`` builds it).
        mixer_options: The mixer's resolved ``[model.mixer]`` options (one mixer).
        pattern: A hybrid stack's ``model.pattern``: the mixers of consecutive blocks, repeated over
            ``n_layers``; empty for one mixer.
        mixers: A hybrid stack's resolved ``[model.mixers.<name>]`` tables: each mixer's options and its
            blocks' MLP keys (``mlp``, ``mlp_ratio``, ...; ``mlp`` and ``mlp_ratio`` below are then unused).
        dim: Model width D.
        n_layers: Number of residual blocks.
        vocab_size: Embedding rows (the tokenizer's vocabulary padded to a multiple of 64).
        max_seq_len: The training context; ``max_position_embeddings`` reads it.
        norm_eps: RMSNorm epsilon.
        mlp: Whether each block has a SwiGLU MLP after the mixer.
        mlp_ratio: SwiGLU hidden size as a multiple of ``dim``.
        tie_word_embeddings: Whether the LM head shares the embedding's weights.
        plugin: The distribution, version and entry point that provided the mixer (informative).
        plugins: A hybrid stack's ``plugin`` of each mixer, by name.
        tokenizer: The tokenizer the model trained with (``data.tokenizer``), None for MQAR models.
        longhorn_zoo_version: The longhorn-zoo version that exported the model (informative).
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "max_position_embeddings": "max_seq_len"}

    def __init__(self, mixer: str = "longhorn", mixer_options: dict[str, Any] | None = None, dim: int = 256,
                 n_layers: int = 4, vocab_size: int = 256, max_seq_len: int = 128, norm_eps: float = 1e-5,
                 mlp: bool = True, mlp_ratio: float = 8 / 3, tie_word_embeddings: bool = False,
                 plugin: dict[str, str] | None = None, tokenizer: str | None = None,
                 longhorn_zoo_version: str | None = None, pattern: list[str] | None = None,
                 mixers: dict[str, dict[str, Any]] | None = None, plugins: dict[str, dict[str, str]] | None = None,
                 **kwargs: Any) -> None:
        self.mixer = mixer
        self.mixer_options = dict(mixer_options or {})
        self.pattern, self.mixers, self.plugins = list(pattern or []), dict(mixers or {}), plugins
        self.dim, self.n_layers, self.vocab_size, self.max_seq_len = dim, n_layers, vocab_size, max_seq_len
        self.norm_eps, self.mlp, self.mlp_ratio = norm_eps, mlp, mlp_ratio
        self.plugin, self.tokenizer, self.longhorn_zoo_version = plugin, tokenizer, longhorn_zoo_version
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
