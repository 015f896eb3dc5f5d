"""Configuration of :class:`~hf_sae.KronSAE`: an SAE whose encoder is factorised into Kronecker heads.

Kurochkin et al., "Kronecker Factorization Improves Efficiency and Interpretability of Sparse Autoencoders"
(arXiv 2505.22255, App. H). The d_sae = h·m·n latents of head h are the mAND products of m "base" and n
"extension" pre-activations, so the encoder costs d_in·h·(m+n) instead of d_in·d_sae.
"""

from __future__ import annotations

from typing import ClassVar

from .configuration_sae import SAEConfig, _positive_int
from .errors import SAEConfigError

KRON_ACTIVATIONS = ("mand", "relu_product")


class KronSAEConfig(SAEConfig):
    r"""Configuration of a KronSAE.

    Args:
        num_heads (`int`, *optional*): number of heads h. Derived from ``d_sae / (base_dim * ext_dim)`` when omitted.
        base_dim (`int`, defaults to 2): m, the base pre-activations per head (the paper recommends m = 2 first).
        ext_dim (`int`, defaults to 4): n, the extension pre-activations per head (m <= n recommended).
        kron_activation (`str`, defaults to `"mand"`): ``"mand"`` (sqrt(u·w) where both are positive) or
            ``"relu_product"`` (ReLU(u)·ReLU(w), the ablation of the paper's Table 1).
        apply_b_dec_to_input (`bool`, defaults to `True`): the encoder reads x − b_dec instead of x (as TopK SAEs
            do). The paper's listing reads raw x; on a residual stream, whose mean dominates the sign of every u and
            w, that leaves most latents dead. KronSAEs saved before this field existed load with it off.
        d_sae: must equal h·m·n; derived from the factors when omitted.

    All other fields are those of :class:`~hf_sae.configuration_sae.SAEConfig`.
    """

    model_type: ClassVar[str] = "kron_sae"
    required_keys: ClassVar[tuple[str, ...]] = ("d_in", "d_sae", "k", "num_heads", "base_dim", "ext_dim")

    d_sae: int | None = None
    num_heads: int | None = None
    base_dim: int = 2
    ext_dim: int = 4
    kron_activation: str = "mand"
    apply_b_dec_to_input: bool = True

    def validate_sae(self) -> None:
        _positive_int("base_dim", self.base_dim)
        _positive_int("ext_dim", self.ext_dim)
        pair = self.base_dim * self.ext_dim
        if self.num_heads is None and self.d_sae is None:
            self.d_sae = 16384
        if self.num_heads is None:
            if self.d_sae % pair:
                raise SAEConfigError(
                    f"d_sae={self.d_sae} is not a multiple of base_dim*ext_dim={pair}: cannot derive num_heads. "
                    f"Pass num_heads, or a d_sae divisible by {pair}."
                )
            self.num_heads = self.d_sae // pair
        _positive_int("num_heads", self.num_heads)
        if self.d_sae is None:
            self.d_sae = self.num_heads * pair
        if self.num_heads * pair != self.d_sae:
            raise SAEConfigError(
                f"num_heads*base_dim*ext_dim = {self.num_heads}*{self.base_dim}*{self.ext_dim} = "
                f"{self.num_heads * pair} != d_sae={self.d_sae}. Set d_sae={self.num_heads * pair} or "
                f"num_heads={self.d_sae // pair if self.d_sae % pair == 0 else '<d_sae / (base_dim*ext_dim)>'}."
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEConfigError(f"apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}.")
        if self.kron_activation not in KRON_ACTIVATIONS:
            raise SAEConfigError(
                f"kron_activation={self.kron_activation!r} is unknown. Use one of {list(KRON_ACTIVATIONS)}."
            )
        super().validate_sae()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As :meth:`SAEConfig.from_dict`; a config.json written before ``apply_b_dec_to_input`` existed was trained
        on raw input, so it loads with the field off."""
        if "apply_b_dec_to_input" not in config_dict:
            config_dict = {**config_dict, "apply_b_dec_to_input": False}
        return super().from_dict(config_dict, **kwargs)

    def display_name(self) -> str:
        return "KronSAE (HierarchicalTopK)" if self.hierarchical else "KronSAE (TopK)"

    def card_tags(self) -> list[str]:
        return ["kron-sae", "hierarchical-topk" if self.hierarchical else "topk"]

    def card_encoder(self) -> str:
        return (
            f"KronSAE encoder (Kurochkin et al. 2025, arXiv 2505.22255): {self.num_heads} heads of "
            f"{self.base_dim}×{self.ext_dim} latents, each the mAND of a base and an extension pre-activation "
            f"({self.kron_activation}), reading {'x − b_dec' if self.apply_b_dec_to_input else 'raw x'}; "
        )

    def card_facts(self) -> list[tuple[str, str]]:
        return [("Kronecker heads", f"{self.num_heads} × ({self.base_dim}×{self.ext_dim})")]
