"""The configuration shared by every hf-sae sparse autoencoder.

Each architecture subclasses :class:`SAEConfig` (see ``configuration_hierarchical_sae.py`` and
``configuration_kron_sae.py``). A config carries three kinds of fields:

* the shape and objective of the SAE (``d_in``, ``d_sae``, ``k``, ``hierarchical``, ``budgets``, AuxK settings);
* where it lives in a language model (``base_model``, ``hook_layer``, ``hook_site``);
* what is needed to reproduce its inputs (``activation_scale``, ``context_length``, ``excluded_token_ids``).

Validation happens at construction and names the bad value and the fix. Configs read from disk are strict:
unknown keys and missing required keys are errors (see :meth:`SAEConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from transformers import PreTrainedConfig

from ._version import __version__
from .errors import SAEConfigError
from .sites import SITES

HOOK_SITES = SITES  # kept for old imports

# Keys that transformers itself writes into (or passes through) a config and that are therefore always allowed.
_TRANSFORMERS_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "auto_map",
        "_commit_hash",
        "attn_implementation",
        "output_attentions",
        "return_unused_kwargs",
    }
)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEConfigError(f"{name} must be a positive integer, got {value!r}. Pass e.g. {name}=1024.")


class SAEConfig(PreTrainedConfig):
    r"""Shared base configuration of an hf-sae SAE.

    Args:
        d_in (`int`, defaults to 2304): width of the activations the SAE reads (Gemma-2 2B residual: 2304).
        d_sae (`int`, defaults to 16384): number of latents F.
        k (`int`, defaults to 64): the largest TopK budget K. Any budget k' <= k can be used at inference.
        hierarchical (`bool`, defaults to `True`): train with the HierarchicalTopK objective (mean of the MSE at every
            budget 1..K, or at ``budgets``); `False` gives the plain TopK loss at K. The objective needs latents with
            an order; the combinations that exist: TopK (``hierarchical_sae``), KronSAE (``kron_sae``) and BatchTopK
            (``batchtopk_sae``, by value: each token's latents sorted descending, budgets 1..the batch's largest L0).
            Matryoshka (nested latent-index prefixes are its own objective) and JumpReLU (a threshold, no ranking)
            refuse it.
        budgets (`list[int]`, *optional*): the subset of budgets the hierarchical loss averages over (each in 1..k).
        auxk (`bool`, defaults to `True`): add the AuxK loss of Gao et al. (2024) on dead latents while training.
        auxk_k (`int`, *optional*): number of dead latents AuxK decodes with; defaults to ``d_in // 2``.
        auxk_coefficient (`float`, defaults to 1/32): weight of the AuxK term.
        dead_tokens (`int`, defaults to 10_000_000): a latent is dead when it has not been in any token's top-k for
            this many tokens.
        base_model (`str`, *optional*): Hub id or path of the language model the SAE reads.
        hook_layer (`int`, *optional*): decoder layer index of the hook site.
        hook_site (`str`, defaults to `"resid"`): one of ``"resid"``, ``"mlp"``, ``"attn"``, ``"attn_z"``.
        activation_scale (`float`, defaults to 1.0): the scalar s with E||s x||^2 = d_in used while training.
        activation_scale_folded (`bool`, defaults to `True`): whether s is folded into the biases, i.e. whether the
            SAE takes raw activations. An unfolded SAE multiplies its input by s and divides its output by s.
        context_length (`int`, *optional*): token window used when harvesting training activations.
        excluded_token_ids (`list[int]`, *optional*): token ids (BOS, padding) excluded from training activations.
        dataset (`str`, *optional*): name of the training data set, recorded for the model card.
        tokens_trained (`int`, defaults to 0): number of activations the SAE was trained on.
        source_format (`str`, *optional*): for an SAE converted by ``hf_sae.convert`` rather than trained by hf-sae,
            the format its weights came from (``"gemma-scope"``, ``"sae-lens"``, ``"sparsify"``); the model card then
            describes the source instead of hf-sae's training. Configs saved before this field load with None.
        source (`str`, *optional*): the converted SAE's source repo / path / hookpoint, for the card.
        hf_sae_version (`str`, *optional*): version of hf-sae that wrote the config.
    """

    model_type: ClassVar[str] = "sae"
    # Keys a config.json must contain to be loadable (checked in ``from_dict``).
    required_keys: ClassVar[tuple[str, ...]] = ("d_in", "d_sae", "k")
    # What the rest of hf-sae asks an architecture (see hf_sae.registry): can hf-sae train it, and does it pick a
    # fixed number k of latents per token whose prefixes are nested budgets (TopK family) rather than a threshold?
    trainable: ClassVar[bool] = True
    topk_budgets: ClassVar[bool] = True
    # Whether the number of active latents varies per token at inference (a threshold: JumpReLU, BatchTopK,
    # Matryoshka): metrics then report the mean L0 and its distribution.
    variable_l0: ClassVar[bool] = False
    # Where the SAE lives and what reproduces its inputs (the second and third kinds above, and d_in, the width of
    # the site): set by whoever trains or converts the SAE, not hyperparameters a user picks for training.
    provenance_fields: ClassVar[tuple[str, ...]] = (
        "d_in",
        "base_model",
        "hook_layer",
        "hook_site",
        "activation_scale",
        "activation_scale_folded",
        "context_length",
        "excluded_token_ids",
        "dataset",
        "tokens_trained",
        "source_format",
        "source",
        "hf_sae_version",
    )

    d_in: int = 2304
    d_sae: int | None = 16384
    k: int = 64
    hierarchical: bool = True
    budgets: list[int] | None = None
    auxk: bool = True
    auxk_k: int | None = None
    auxk_coefficient: float = 1.0 / 32.0
    dead_tokens: int = 10_000_000
    base_model: str | None = None
    hook_layer: int | None = None
    hook_site: str = "resid"
    activation_scale: float = 1.0
    activation_scale_folded: bool = True
    context_length: int | None = None
    excluded_token_ids: list[int] | None = None
    dataset: str | None = None
    tokens_trained: int = 0
    source_format: str | None = None
    source: str | None = None
    hf_sae_version: str | None = None

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _TRANSFORMERS_KEYS - {"num_labels", "id2label", "label2id"})
        if unknown:
            raise SAEConfigError(
                f"{type(self).__name__} got unknown argument(s) {unknown}. Known fields: "
                f"{sorted(self.field_names())}. Remove or rename them."
            )
        if self.hf_sae_version is None:
            self.hf_sae_version = __version__
        super().__post_init__(**kwargs)
        self.validate_sae()

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate_sae(self) -> None:
        """Check every SAE field; raise :class:`SAEConfigError` naming the value and the fix."""
        _positive_int("d_in", self.d_in)
        if self.d_sae is None:
            raise SAEConfigError("d_sae is required (the number of latents), e.g. d_sae=16384.")
        _positive_int("d_sae", self.d_sae)
        _positive_int("k", self.k)
        if self.k > self.d_sae:
            raise SAEConfigError(
                f"k={self.k} is larger than d_sae={self.d_sae}: TopK cannot pick more latents than exist. "
                f"Use k <= {self.d_sae} or a wider SAE."
            )
        if self.budgets is not None:
            budgets = list(self.budgets)
            if not budgets:
                raise SAEConfigError("budgets=[] is empty: pass None (all budgets 1..k) or a list such as [8, 16, 32].")
            bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.k]
            if bad:
                raise SAEConfigError(f"budgets {bad} are outside 1..k={self.k}. Every budget must be in 1..{self.k}.")
            if len(set(budgets)) != len(budgets):
                raise SAEConfigError(f"budgets {budgets} has duplicates; list each budget once.")
            self.budgets = sorted(budgets)
        if self.auxk_k is not None:
            _positive_int("auxk_k", self.auxk_k)
        if not (isinstance(self.auxk_coefficient, (int, float)) and self.auxk_coefficient >= 0):
            raise SAEConfigError(f"auxk_coefficient must be a number >= 0, got {self.auxk_coefficient!r}.")
        _positive_int("dead_tokens", self.dead_tokens)
        if self.hook_site not in HOOK_SITES:
            raise SAEConfigError(f"hook_site={self.hook_site!r} is not a known site. Use one of {list(HOOK_SITES)}.")
        if self.hook_layer is not None and (
            isinstance(self.hook_layer, bool) or not isinstance(self.hook_layer, int) or self.hook_layer < 0
        ):
            raise SAEConfigError(f"hook_layer must be an integer >= 0 (or None), got {self.hook_layer!r}.")
        scale = self.activation_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise SAEConfigError(f"activation_scale must be a finite number > 0, got {scale!r}.")
        if self.context_length is not None:
            _positive_int("context_length", self.context_length)
        _non_negative = isinstance(self.tokens_trained, int) and self.tokens_trained >= 0
        if not _non_negative:
            raise SAEConfigError(f"tokens_trained must be an integer >= 0, got {self.tokens_trained!r}.")

    @property
    def auxk_k_effective(self) -> int:
        """The number of dead latents AuxK uses: ``auxk_k`` or ``d_in // 2`` (at most ``d_sae``)."""
        return min(self.auxk_k if self.auxk_k is not None else max(1, self.d_in // 2), self.d_sae)

    @property
    def budget_list(self) -> list[int]:
        """The budgets the hierarchical loss averages over: ``budgets`` or 1..k."""
        return list(self.budgets) if self.budgets is not None else list(range(1, self.k + 1))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Strict loading: a config.json must name every required key and no unknown one."""
        source = kwargs.get("name_or_path") or config_dict.get("_name_or_path") or "config.json"
        model_type = config_dict.get("model_type")
        if model_type is not None and cls.model_type not in ("sae", model_type):
            raise SAEConfigError(
                f"{source}: model_type={model_type!r} but {cls.__name__} expects {cls.model_type!r}. "
                "Load it with transformers.AutoModel.from_pretrained, which picks the class from model_type."
            )
        missing = [key for key in cls.required_keys if key not in config_dict]
        if missing:
            raise SAEConfigError(
                f"{source}: config is missing required key(s) {missing} for {cls.__name__}. "
                "Re-save the SAE with save_pretrained, or add the keys to config.json."
            )
        known = cls.field_names() | _TRANSFORMERS_KEYS
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise SAEConfigError(
                f"{source}: config has unknown key(s) {unknown} for {cls.__name__}. "
                "It may come from another library or a newer hf-sae; convert it with hf_sae.convert or upgrade hf-sae."
            )
        return super().from_dict(config_dict, **kwargs)

    # ----------------------------------------------------------------------------- what the model card says
    # Each architecture describes itself; hf_sae.cards asks these and never branches on model_type.
    def display_name(self) -> str:
        """Human name of the architecture and objective, e.g. ``"HierarchicalTopK"`` (card titles and tables)."""
        return "HierarchicalTopK" if self.hierarchical else "TopK"

    def card_tags(self) -> list[str]:
        """Hub tags naming the architecture and objective (after ``sparse-autoencoder`` and ``hf-sae``)."""
        return ["hierarchical-topk" if self.hierarchical else "topk"]

    def card_encoder(self) -> str:
        """One clause on the encoder, cited by paper."""
        return "TopK encoder (Gao et al. 2024): a = ReLU(W_encᵀ(x − b_dec) + b_enc), the k largest kept; "

    def card_objective(self) -> str:
        """What the SAE is and how it was trained: the card's "Training" paragraph (for a converted SAE: where its
        weights came from, since hf-sae did not train it)."""
        if self.source_format:
            return (
                self.card_encoder()
                + f"k = {self.k}. Converted exactly from {self.source_format}"
                + (f" (`{self.source}`)" if self.source else "")
                + ", not trained by hf-sae: its training objective, data and decoder-row norms are the source's "
                "(rows are kept as they are, not renormalised, so they need not be unit-norm). See the source for "
                "how it was trained."
            )
        budgets = f"budgets {self.budgets}" if self.budgets else f"every budget 1..{self.k}"
        if self.hierarchical:
            loss = (
                f"trained with the HierarchicalTopK objective (Balagansky et al. 2025, arXiv 2505.24473): the mean of "
                f"the reconstruction MSE at {budgets}, so every prefix budget k' ≤ {self.k} of the sorted latents is "
                "a good SAE"
            )
        else:
            loss = f"trained with the plain TopK reconstruction MSE at k = {self.k}"
        if self.auxk:
            loss += f", plus AuxK on dead latents (coefficient {self.auxk_coefficient:g})"
        return self.card_encoder() + loss + ". Decoder rows are kept unit-norm during training."

    def card_facts(self) -> list[tuple[str, str]]:
        """Extra (label, value) rows of the card's facts table, after d_in, d_sae and k."""
        return []

    def card_limitations(self) -> list[str]:
        """Limitations that hold for every SAE of this architecture."""
        return []

    def card_source_note(self) -> str | None:
        """Where the weights came from, when they were converted rather than trained by hf-sae."""
        if not self.source_format:
            return None
        return f"Converted from {self.source_format}" + (f": `{self.source}`." if self.source else ".")
