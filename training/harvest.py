"""Activations on the fly: a frozen language model, hooks at the SAE sites, and a shuffle buffer.

:class:`ActivationHarvester` runs the language model (eval, no grad, in its own dtype) through the shared site
resolver's :func:`hf_sae.sites.capture_activations`, which stops the forward right after the deepest hooked site,
so later layers and the LM head never run. One forward serves every SAE of the run: activations are keyed by
``(layer, site)``, and SAEs that read the same site share them.

:class:`ActivationBuffer` mixes activations across many windows before SAE batches are drawn. It works in rounds:
fill with at least ``buffer_size`` activations (plus the < batch_size rows left over from the previous round),
permute them with a generator seeded by (seed, process, round), hand out full batches. A round is therefore a pure
function of where the data stood when it started, so a checkpoint stores only that position, the leftover rows
and how many batches were drawn; resuming re-harvests the round and skips those batches, bit-exactly on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import psutil
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hf_sae.errors import BufferMemoryError, NonFiniteActivationsError
from hf_sae.sites import Site, capture_activations

from .data import TokenWindows

logger = logging.getLogger(__name__)

SiteKey = tuple[int, str]


class ActivationHarvester:
    """Runs the LM up to the deepest site and returns the activations of the tokens that are trained on.

    Args:
        model: the language model (frozen; this class only calls it under ``torch.no_grad``).
        sites: resolved sites (:func:`hf_sae.sites.resolve_site`); duplicates are harvested once.
        excluded_token_ids: ids whose positions are dropped (BOS, padding by default).
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], excluded_token_ids: Sequence[int]):
        self.model = model
        unique: dict[SiteKey, Site] = {}
        for site in sites:
            unique.setdefault(site.key, site)
        self.sites = list(unique.values())
        self.widths = {site.key: site.width for site in self.sites}
        self.device = next(model.parameters()).device
        self.excluded = torch.tensor(sorted(set(excluded_token_ids)), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def activations(self, input_ids: Tensor, attention_mask: Tensor) -> dict[SiteKey, Tensor]:
        """{(layer, site): (B, T, width)} for every position (no exclusion), from an early-stopped forward."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        return capture_activations(
            self.model, self.sites, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )

    def keep_mask(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) bool: real tokens that are not excluded (BOS, padding, ``excluded_token_ids``)."""
        input_ids = input_ids.to(self.device)
        return attention_mask.to(self.device).bool() & ~torch.isin(input_ids, self.excluded)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> dict[SiteKey, Tensor] | None:
        """{(layer, site): (n, width)} for the n kept tokens, or None when any of them is NaN/inf."""
        captured = self.activations(input_ids, attention_mask)
        keep = self.keep_mask(input_ids, attention_mask)
        kept = {key: activation[keep] for key, activation in captured.items()}
        if not all(bool(torch.isfinite(a).all()) for a in kept.values()):
            return None
        return kept


def available_memory(device: torch.device) -> int:
    """Bytes free for a new tensor on ``device`` (RAM shared by this machine's processes for CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().available // max(1, local_processes)


class ActivationBuffer:
    """A resumable shuffle buffer of harvested activations (see the module docstring).

    Args:
        windows: the packed token stream of this process (looping).
        harvester: turns a batch of windows into {(layer, site): (n, width)} activations.
        buffer_size: activations per round (the mixing span: ~buffer_size / context_length windows).
        batch_size: rows per SAE batch.
        lm_batch_size: windows per LM forward.
        dtype: storage dtype (the LM's dtype).
        storage_device: where the buffer lives (CPU, pinned when ``pin_memory``, or the training device).
        seed, rank: seed the per-round permutation.
        max_nonfinite_batches: consecutive NaN/inf LM batches tolerated (each skipped and counted).
        progress: show a one-line bar while a round fills (rank 0 only, on a terminal, once it takes over
            ``progress_delay`` seconds): a refill of 65k activations takes ~half a minute on 2 CPU cores.
    """

    def __init__(
        self,
        windows: TokenWindows,
        harvester: ActivationHarvester,
        buffer_size: int,
        batch_size: int,
        lm_batch_size: int,
        dtype: torch.dtype,
        storage_device: torch.device,
        seed: int = 0,
        rank: int = 0,
        pin_memory: bool = False,
        max_nonfinite_batches: int = 10,
        progress: bool = True,
        progress_delay: float = 2.0,
    ):
        self.windows = windows
        self.harvester = harvester
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.lm_batch_size = lm_batch_size
        self.storage_device = torch.device(storage_device)
        self.seed, self.rank = seed, rank
        self.max_nonfinite_batches = max_nonfinite_batches
        self.progress = progress and rank == 0
        self.progress_delay = progress_delay
        capacity = buffer_size + lm_batch_size * windows.context_length + batch_size
        widths = harvester.widths
        need = capacity * sum(widths.values()) * torch.empty((), dtype=dtype).element_size()
        free = available_memory(self.storage_device)
        if need > 0.8 * free:
            per_row = sum(widths.values()) * torch.empty((), dtype=dtype).element_size()
            fits = max(batch_size, int(0.5 * free / per_row) - lm_batch_size * windows.context_length - batch_size)
            raise BufferMemoryError(
                f"the shuffle buffer needs {need / 2**30:.1f} GiB ({capacity} activations x widths "
                f"{list(widths.values())} in {dtype}) on {self.storage_device}, but only {free / 2**30:.1f} GiB is "
                f"free per process. Lower --buffer-size (e.g. --buffer-size {fits}), train fewer sites at once, or "
                + ("use --buffer-device cpu." if self.storage_device.type != "cpu" else "use a machine with more RAM.")
            )
        pin = pin_memory and self.storage_device.type == "cpu"
        self.storage = {
            key: torch.empty(capacity, width, dtype=dtype, device=self.storage_device, pin_memory=pin)
            for key, width in widths.items()
        }
        self.round = 0
        self.carry = 0  # rows at the front of storage left over from the previous round
        self.rows = 0
        self.drawn = 0
        self.num_batches = 0
        self.permutation: Tensor | None = None
        self.round_start: dict[str, Any] | None = None
        self.nonfinite_batches = 0  # LM batches skipped for NaN/inf, in total
        self._consecutive_nonfinite = 0

    # ------------------------------------------------------------------------------------------------- rounds
    def _fill(self) -> None:
        """Harvest a new round on top of the carried rows and draw its permutation."""
        self.round_start = {
            "round": self.round,
            "windows": self.windows.state(),
            "carry": {key: store[: self.carry].cpu().clone() for key, store in self.storage.items()},
        }
        rows = self.carry
        bar = tqdm(
            total=self.buffer_size,
            initial=min(rows, self.buffer_size),
            desc=f"harvest round {self.round}",
            unit="act",
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
            delay=self.progress_delay,
            disable=None if self.progress else True,  # None: tqdm shows it only on a terminal
        )
        with bar:
            rows = self._harvest_until_full(rows, bar)
        self.rows = rows
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + self.round)
        self.permutation = torch.randperm(rows, generator=generator).to(self.storage_device)
        self.num_batches = rows // self.batch_size
        self.drawn = 0

    def _harvest_until_full(self, rows: int, bar: tqdm) -> int:
        """Append harvested LM batches to storage from row ``rows`` until ``buffer_size``; the rows filled."""
        while rows < self.buffer_size:
            batch = self.windows.next_batch(self.lm_batch_size)
            if batch is None:  # only a finite stream ends; training streams loop
                break
            kept = self.harvester(*batch)
            if kept is None:
                self.nonfinite_batches += 1
                self._consecutive_nonfinite += 1
                logger.warning(
                    "skipped a language-model batch with NaN/inf activations (%d so far)", self.nonfinite_batches
                )
                if self._consecutive_nonfinite > self.max_nonfinite_batches:
                    keys = ", ".join(f"layer {layer} {site}" for layer, site in self.storage)
                    raise NonFiniteActivationsError(
                        f"the language model produced NaN/inf activations at {keys} in "
                        f"{self._consecutive_nonfinite} consecutive batches (skipped {self.nonfinite_batches} in "
                        "all), so training stopped. Load the model in float32 (--lm-dtype float32), check its "
                        "weights, or raise --max-nonfinite-batches if it is rare."
                    )
                continue
            self._consecutive_nonfinite = 0
            n = next(iter(kept.values())).shape[0]
            for key, activation in kept.items():
                self.storage[key][rows : rows + n].copy_(activation, non_blocking=False)
            bar.update(min(rows + n, self.buffer_size) - min(rows, self.buffer_size))
            rows += n
        return rows

    def _next_round(self) -> None:
        """Move the rows no batch used to the front, then fill the next round."""
        used = self.num_batches * self.batch_size
        rest = self.permutation[used:]
        for store in self.storage.values():
            store[: rest.numel()] = store.index_select(0, rest)
        self.carry = rest.numel()
        self.round += 1
        self._fill()

    def next_batch(self, device: torch.device | None = None) -> dict[SiteKey, Tensor]:
        """{(layer, site): (batch_size, width)} of shuffled activations, on ``device``."""
        if self.permutation is None:
            self._fill()
        while self.drawn >= self.num_batches:
            self._next_round()
        index = self.permutation[self.drawn * self.batch_size : (self.drawn + 1) * self.batch_size]
        self.drawn += 1
        return {
            key: store.index_select(0, index).to(device or self.storage_device) for key, store in self.storage.items()
        }

    def peek(self, rows: int) -> dict[SiteKey, Tensor]:
        """The first ``rows`` activations the next batches will use (for scale and b_dec estimation)."""
        if self.permutation is None:
            self._fill()
        index = self.permutation[self.drawn * self.batch_size :][:rows]
        return {key: store.index_select(0, index) for key, store in self.storage.items()}

    # -------------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Where the current round started, its carried rows, and the batches drawn from it."""
        if self.permutation is None:
            self._fill()
        return {
            "round_start": self.round_start,
            "drawn": self.drawn,
            "nonfinite_batches": self.nonfinite_batches,
            "non_text_rows": self.windows.non_text_rows,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Re-harvest the round a checkpoint was in and skip the batches it had drawn."""
        start = state["round_start"]
        self.windows.load_state(start["windows"])
        self.round = start["round"]
        self.carry = next(iter(start["carry"].values())).shape[0] if start["carry"] else 0
        for key, rows in start["carry"].items():
            self.storage[key][: self.carry].copy_(rows)
        self._fill()
        self.drawn = state["drawn"]
        self.nonfinite_batches = state["nonfinite_batches"]


if __name__ == "__main__":  # python -m training.harvest: the activation cache (training/activation_cache.py)
    from .activation_cache import main

    main()
