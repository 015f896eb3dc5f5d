"""The state of one training run, shared by the loop, the checkpoints and the finish (one object, not 18 arguments)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from hf_sae.latent_parallel import gather_optimizer_state, gather_sae
from hf_sae.modeling_sae import SAEPreTrainedModel
from hf_sae.sites import Site

from . import checkpoint as ckpt
from .activation_cache import CachedActivations
from .config import SAESpec, TrainConfig
from .harvest import ActivationBuffer, ActivationHarvester


@dataclass
class Run:
    """A run: its config and accelerator, the language model and what reads it, the SAEs and the bookkeeping.

    ``trainer_state`` is what a checkpoint restores besides weights and optimiser: ``step``, ``skipped_steps``,
    ``seconds`` (training time of every session so far), ``data_files`` (the local training files' sizes and times).
    ``start_step`` is where this session began (0 unless resumed).
    """

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    sites: list[Site]
    run_dir: Path
    model_name: str
    data_name: str
    excluded: list[int]
    harvester: ActivationHarvester
    buffer: ActivationBuffer | CachedActivations  # the on-the-fly harvest, or --activations
    eval_data: Callable[[], Any]
    total_steps: int
    config_yaml: str | None = None  # the run's train_config.yaml text (main process), once the folder is prepared
    start_step: int = 0
    saes: list[SAEPreTrainedModel] = field(default_factory=list)
    dead_tokens: list[int] = field(default_factory=list)  # each SAE's threshold, in tokens of all processes
    trainer_state: dict[str, Any] = field(default_factory=lambda: {"step": 0, "skipped_steps": 0, "seconds": 0.0})
    setup_seconds: float = 0.0
    session_tokens: int = 0
    session_seconds: float = 0.0

    @property
    def specs(self) -> list[SAESpec]:
        return self.cfg.saes

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def data_world(self) -> int:
        """Processes reading different data: all of them, or one stream read by every process (--shard-latents)."""
        return 1 if self.cfg.shard_latents else self.world

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.data_world

    def save_checkpoint(self, step: int, optimizer, scheduler) -> None:
        """Gather every process's data position and RNG state, then the main process writes the checkpoint."""
        process_states = gather_object([{"buffer": self.buffer.state(), "rng": ckpt.rng_state()}])
        saes, optimizer_state = self.saes, optimizer
        if self.cfg.shard_latents:  # every process sends its shards; the checkpoint holds whole SAEs
            saes = [gather_sae(sae) for sae in self.saes]
            optimizer_state = gather_optimizer_state(optimizer, self.saes)
        if self.accelerator.is_main_process:
            state = {
                **self.trainer_state,
                "step": step,
                "tokens": step * self.tokens_per_step,
                "processes": self.world,
                "nonfinite_lm_batches": sum(s["buffer"]["nonfinite_batches"] for s in process_states),
                "non_text_rows": sum(s["buffer"]["non_text_rows"] for s in process_states),
            }
            ckpt.save_checkpoint(
                self.run_dir,
                step,
                saes,
                optimizer_state,
                scheduler,
                state,
                process_states,
                self.config_yaml,
                keep=self.cfg.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()
