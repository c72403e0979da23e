"""Configuration of the embedded reference unified model ("digits").

Field names follow `Qwen2Config` (hidden_size, intermediate_size, num_key_value_heads,
rope_parameters ...) so that the Qwen2 building blocks (`Qwen2MLP`, `Qwen2RotaryEmbedding`) accept
this config directly and the architecture adapters read the same attributes as on a real Qwen2.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .vocab import EOS, PAD, WORDS

VARIANTS = ("shared", "mot")
_LAYER_LISTS = ("skip_layers_und", "skip_layers_gen", "drop_attention_layers", "drop_mlp_layers")
SIZES = ("tiny", "small")


@strict
class UniDigitsConfig(PreTrainedConfig):
    r"""A small unified (understanding + generation) decoder over 8x16 two-digit scenes.

    variant: `shared` = one weight set for every token (Show-o / Janus-like); `mot` = every layer
        has an understanding copy and a `_moe_gen` generation copy of its norms, attention
        projections and MLP, chosen per token by modality (BAGEL-like mixture-of-transformers).
    vocab: the word list (see `vocab.py`), stored so a checkpoint carries its tokenizer.
    image_height/image_width/patch_size: the canvas and its patching (8x16, 2x2 -> 32 tokens of 4).
    head_hidden_size: width of the diffusion head that maps image hidden states to velocities.
    sample_steps/cfg_scale: sampler defaults (Euler steps, classifier-free guidance scale).
    cfg_dropout: probability that a training prompt is replaced by the null prompt.
    faint_scale: grey-level factor of a faint digit.

    Set by surgery (the prune stage), so that a pruned checkpoint rebuilds itself on load:
    intermediate_size_gen: width of `mlp_moe_gen` (mot; pinned to intermediate_size when unset).
    skip_layers_und / skip_layers_gen: layers the understanding / generation task runs past.
    drop_attention_layers / drop_mlp_layers: layers whose attention / MLP sublayer (with its
        norm) is not built at all.
    """

    model_type = "unidigits"

    variant: str = "shared"
    vocab: list[str] | None = None
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 64
    rope_parameters: dict | None = None
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    image_height: int = 8
    image_width: int = 16
    patch_size: int = 2
    head_hidden_size: int = 256
    sample_steps: int = 20
    cfg_scale: float | int = 3.0
    cfg_dropout: float = 0.1
    faint_scale: float = 0.4
    intermediate_size_gen: int | None = None
    skip_layers_und: list[int] | None = None
    skip_layers_gen: list[int] | None = None
    drop_attention_layers: list[int] | None = None
    drop_mlp_layers: list[int] | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.vocab is None:
            self.vocab = list(WORDS)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.variant == "mot" and self.intermediate_size_gen is None:
            self.intermediate_size_gen = self.intermediate_size  # pinned: pruning `mlp` must not resize `mlp_moe_gen`
        for name in _LAYER_LISTS:
            setattr(self, name, sorted(getattr(self, name) or []))
        self.pad_token_id = self.vocab.index(PAD)
        self.eos_token_id = self.vocab.index(EOS)
        super().__post_init__(**kwargs)

    @property
    def adapter_key(self) -> str:
        """The built-in adapter of this variant (`modeling.adapters.ADAPTERS`)."""
        return f"unidigits-{self.variant}"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size

    def validate_architecture(self):
        """Part of `@strict` validation: every error names the field and the bad value."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in _LAYER_LISTS:
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"{name} holds layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide the {self.image_height}x{self.image_width} canvas")


_SIZES = {
    # Trains to better than chance in seconds; for tests.
    "tiny": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_hidden_size=64),
    # The default: reaches the NOTES.md targets in minutes on 2 CPU cores.
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_hidden_size=256),
}  # fmt: skip


def reference_config(size: str = "small", variant: str = "shared") -> UniDigitsConfig:
    """The named reference model sizes (`tiny`, `small`) in either variant (`shared`, `mot`)."""
    if size not in _SIZES:
        raise ValueError(f"reference size must be one of {SIZES}, got {size!r}")
    if variant not in VARIANTS:
        raise ValueError(f"reference variant must be one of {VARIANTS}, got {variant!r}")
    return UniDigitsConfig(variant=variant, **_SIZES[size])
