"""Configuration of :class:`~hf_sae.MatryoshkaSAE`: a BatchTopK SAE trained so that every dictionary prefix is an SAE.

Bussmann, Nabeshima, Karvonen and Nanda, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders"
(arXiv 2503.17547); Nabeshima, "Matryoshka Sparse Autoencoders" (2024). The latents are split into G groups of
consecutive indices; prefix g is groups 0..g (its first m_g latents), and the loss sums the reconstruction MSE of
every prefix, each decoding only its own latents. Selection is BatchTopK (:class:`~hf_sae.BatchTopKSAEConfig`).
"""

from __future__ import annotations

from typing import ClassVar

from .configuration_batchtopk_sae import BatchTopKSAEConfig
from .errors import SAEConfigError


def doubling_group_sizes(d_sae: int, groups: int = 5) -> list[int]:
    """Group sizes whose prefixes double up to d_sae: d_sae/16, /8, /4, /2, 1 -> [F/16, F/16, F/8, F/4, F/2]
    (fewer groups when d_sae is too small for each to hold a latent)."""
    widths = sorted({max(1, d_sae >> shift) for shift in range(groups - 1, -1, -1)})
    return [b - a for a, b in zip([0, *widths[:-1]], widths)]


class MatryoshkaSAEConfig(BatchTopKSAEConfig):
    r"""Configuration of a Matryoshka BatchTopK SAE.

    Args:
        group_sizes (`list[int]`, *optional*): the sizes of the consecutive latent groups, summing to d_sae; prefix
            g holds groups 0..g, so its width is m_g = the sum of the first g+1 sizes (m_1 < … < m_G = d_sae).
            Defaults to prefixes that double: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae.
        hierarchical (`bool`, defaults to `False`): must stay False (the nested prefixes are the objective).

    All other fields are those of :class:`~hf_sae.BatchTopKSAEConfig` (k: the mean L0 of BatchTopK; the threshold).
    """

    model_type: ClassVar[str] = "matryoshka_sae"

    group_sizes: list[int] | None = None

    def validate_sae(self) -> None:
        if self.hierarchical:
            raise SAEConfigError(
                "hierarchical=True is not supported by MatryoshkaSAEConfig: its objective is already nested (over "
                "latent-index prefixes). Pass hierarchical=False (the default), or train a batchtopk_sae."
            )
        if self.group_sizes is None and isinstance(self.d_sae, int) and self.d_sae > 0:
            self.group_sizes = doubling_group_sizes(self.d_sae)
        sizes = list(self.group_sizes or [])
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
            raise SAEConfigError(
                f"group_sizes must be a non-empty list of positive integers, got {self.group_sizes!r}; e.g. "
                "group_sizes=[256, 768, 3072] for d_sae=4096."
            )
        if sum(sizes) != self.d_sae:
            raise SAEConfigError(
                f"group_sizes {sizes} sum to {sum(sizes)}, not d_sae={self.d_sae}: the groups must split the whole "
                f"dictionary. Make the last size {self.d_sae - sum(sizes[:-1])} or change d_sae."
            )
        self.group_sizes = sizes
        super().validate_sae()

    @property
    def prefix_widths(self) -> list[int]:
        """m_1 < … < m_G = d_sae: the number of latents of each prefix."""
        widths, total = [], 0
        for size in self.group_sizes:
            total += size
            widths.append(total)
        return widths

    def display_name(self) -> str:
        return "Matryoshka BatchTopK"

    def card_tags(self) -> list[str]:
        return ["matryoshka", "batchtopk"]

    def card_objective(self) -> str:
        if self.source_format:
            return super().card_objective()
        loss = (
            "trained with the Matryoshka objective (Bussmann et al. 2025, arXiv 2503.17547): the sum over the "
            f"nested prefixes of {self.prefix_widths} latents of the reconstruction MSE from that prefix's latents "
            "only, so early latents learn general features and later groups refine them"
        )
        if self.auxk:
            loss += f", plus AuxK on dead latents (coefficient {self.auxk_coefficient:g})"
        return self.card_encoder() + loss + ". Decoder rows are kept unit-norm during training."

    def card_facts(self) -> list[tuple[str, str]]:
        return [*super().card_facts(), ("prefix widths", ", ".join(f"{w:,}" for w in self.prefix_widths))]
