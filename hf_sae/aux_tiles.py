"""AuxK's dead-latent block by L2 tiles on CPU: the products of the (N, C) choice matrix without a dense block.

AuxK decodes the k_aux best of the C = n_dead dead latents per token. Once k_aux / C is a sizeable share
(:data:`hf_sae.sparse.DENSE_AUX_DENSITY`, 1/8) the gathered row-by-row kernels are bound by cache bandwidth, and the
(N, C) x (C, d) matrix multiplies of :func:`hf_sae.sparse.dense_aux_block` cost the same at any density. The
compiled kernels of ``kernels/aux_cpu.cpp`` visit the pairs in cells of (block of output rows, tile of the rows read
at random) so that the tile stays in L2 and an output row's chunk in registers: the half-dead AuxK step of
``benchmarks/bench_sae_step.py`` (density 320 / 2048 at the small shape) takes 0.76x / 0.80x the dense block's time
at the small / large shape on 2 cores. Above :data:`TILED_MAX_DENSITY` the dense matmul wins again (its cost does
not grow with k_aux).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import aux_cpu_kernels

TILED_MAX_DENSITY = 1 / 4  # k_aux / C from which the dense block's matmuls are cheaper than the tiled passes
BLOCK_ROWS = 128  # output rows per block (one thread's rows; powers of two)
AUX_TILE_BYTES = 192 << 10  # the tile of rows read at random (L2 holds it with room to spare): 64 rows at d 640, fp32


@dataclass(frozen=True)
class AuxTiles:
    """The visiting plan of one step's AuxK choice: ``positions`` (N, k_aux) into the C dead ``columns``."""

    positions: Tensor
    columns: Tensor
    row_start: Tensor
    row_order: Tensor
    col_start: Tensor
    col_order: Tensor

    def decode(self, values: Tensor, block_rows: Tensor) -> Tensor:
        """values (N, k_aux), block_rows (C, d) -> (N, d): Σ_t values[n, t] block_rows[positions[n, t]]."""
        return aux_cpu_kernels().aux_decode(
            self.row_start, self.row_order, self.positions, values.contiguous(), block_rows.contiguous(), BLOCK_ROWS
        )

    def dots(self, rows: Tensor, block_rows: Tensor) -> Tensor:
        """rows (N, d), block_rows (C, d) -> (N, k_aux): <rows[n], block_rows[positions[n, t]]>."""
        return aux_cpu_kernels().aux_dots(
            self.row_start, self.row_order, self.positions, rows.contiguous(), block_rows.contiguous(), BLOCK_ROWS
        )

    def scatter(self, coefficients: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """coefficients (N, k_aux), rows (N, d) -> ((C, d): Σ over positions[n, t] = c of coefficients[n, t]
        rows[n], (C,): the coefficients' sums per c) — the dead block's rows of Sᵀ·rows and of Sᵀ1."""
        return tuple(
            aux_cpu_kernels().aux_scatter(
                self.col_start,
                self.col_order,
                self.positions,
                coefficients.to(rows.dtype).contiguous(),
                rows.contiguous(),
                self.columns.numel(),
                BLOCK_ROWS,
            )
        )


def aux_tiles(columns: Tensor, positions: Tensor, dtype: torch.dtype, d: int) -> AuxTiles | None:
    """The tiled plan for the dead block (columns (C,), positions (N, k_aux)) of rows of width ``d``, or None where
    the tiled kernels do not apply (not CPU, not float32/float64, no pairs, no compiled kernel) or lose (density
    k_aux / C >= 1/4). Tiles hold the largest power of two of rows within :data:`AUX_TILE_BYTES`."""
    if positions.device.type != "cpu" or dtype not in (torch.float32, torch.float64) or positions.numel() == 0:
        return None
    if positions.shape[-1] >= TILED_MAX_DENSITY * columns.numel() or aux_cpu_kernels() is None:
        return None
    positions = positions.contiguous()
    rows = max(1, AUX_TILE_BYTES // max(1, d * torch.finfo(dtype).bits // 8))
    plan = aux_cpu_kernels().aux_plan(positions, columns.numel(), BLOCK_ROWS, 1 << (rows.bit_length() - 1))
    return AuxTiles(positions, columns, *plan)
