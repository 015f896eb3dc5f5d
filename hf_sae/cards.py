"""Model cards for hf-sae SAEs, generated from the config and the run's metrics (never hand-edited).

:func:`generate_model_card` fills ``model_cards/sae_card_template.md`` (a Jinja template rendered by
``huggingface_hub.ModelCard.from_template``) and :func:`generate_collection_card` fills
``model_cards/sae_collection_card_template.md``. ``hf_sae.hub`` regenerates the card on every push.

The card's YAML has ``library_name: hf-sae``, ``tags`` (``sparse-autoencoder``, ``hf-sae``, the architecture, the
site), ``base_model``, ``datasets``, ``license`` and a ``model-index`` with EV/FVU at every reported budget, L0, the
dead fraction and the CE loss recovered when known. The body has a summary (site, layer, width, k, tokens), a usage
snippet (load, encode, steer), the metrics table, the EV-vs-budget plot when the run made one, how it was trained
(objective, command, config) and limitations.

Metrics (``metrics.json`` of a run, or the ``metrics`` argument) — every key optional::

    {
      "budgets": {"1": {"explained_variance": 0.41, "fvu": 0.59, "l0": 1.0, "dead_fraction": 0.2, "shrinkage": 0.9},
                  ..., "64": {...}},          # or a list of {"k": 1, ...}; "ev" is accepted for explained_variance
      "explained_variance": 0.83, "fvu": 0.17, "l0": 64.0, "dead_fraction": 0.01,   # at k (else budgets[k])
      "ce_loss_recovered": 0.93, "clean_loss": 2.2, "spliced_loss": 2.4, "ablated_loss": 5.1,
                                              # or nested as "lm": {...} (hf_sae.evaluation.LMLossResult.as_dict())
      "eval_tokens": 32768, "eval_dataset": "embedded English text", "tokens_trained": 5000000,
      "command": "python -m training.train ...", "limitations": ["..."], "license": "apache-2.0"
    }

A run's ``metrics.json`` in training/'s format, ``{"run": {"model", "dataset", "tokens", ...}, "saes": {name: {...}}}``,
is narrowed to the SAE's own entry (:func:`sae_metrics`); ``run.tokens`` / ``run.dataset`` / ``run.command`` and
``dead_fraction_eval`` (latents that never fire on the held-out tokens) are used when present.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_TEMPLATE = "sae_card_template.md"
COLLECTION_TEMPLATE = "sae_collection_card_template.md"
# Plots a run may leave next to its SAE, in order of preference (the first found goes into the card).
PLOT_NAMES = ("budget_curves.png", "ev_vs_budget.png", "ev_l0_vs_budget.png")
DEFAULT_LICENSE = "apache-2.0"

_ARCH_TAGS = {"hierarchical_sae": "hierarchical-topk", "kron_sae": "kron-sae", "jumprelu_sae": "jumprelu"}
_SITE_WORDS = {
    "resid": "residual stream after",
    "mlp": "MLP output (after the post-MLP norm) of",
    "attn": "attention output (after o_proj and the post-attention norm) of",
    "attn_z": "concatenated attention head outputs (input of o_proj) of",
}
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


def _budget_entry(raw: Mapping[str, Any]) -> dict[str, float]:
    entry = {}
    for key, aliases in (
        ("explained_variance", ("explained_variance", "ev")),
        ("fvu", ("fvu",)),
        ("l0", ("l0",)),
        ("dead_fraction", ("dead_fraction", "dead")),
        ("shrinkage", ("shrinkage",)),
    ):
        for alias in aliases:
            if (value := _number(raw.get(alias))) is not None:
                entry[key] = value
                break
    if "fvu" in entry and "explained_variance" not in entry:
        entry["explained_variance"] = 1.0 - entry["fvu"]
    if "explained_variance" in entry and "fvu" not in entry:
        entry["fvu"] = 1.0 - entry["explained_variance"]
    return entry


def normalize_metrics(metrics: Mapping[str, Any] | None, k: int | None = None) -> dict[str, Any]:
    """A run's metrics (see the module docstring) -> ``{"budgets": {k': {...}}, "ce_loss_recovered": ..., ...}``.

    Unknown keys are kept; budgets are ints, sorted; values that are not finite numbers are dropped.
    """
    metrics = dict(metrics or {})
    run = metrics.get("run") if isinstance(metrics.get("run"), Mapping) else {}
    for key, run_key in (("tokens_trained", "tokens"), ("eval_dataset", "dataset"), ("command", "command")):
        if metrics.get(key) is None and run.get(run_key) is not None:
            metrics[key] = run[run_key]
    if _number(metrics.get("dead_fraction_eval")) is not None:  # never fired on the held-out tokens
        metrics["dead_fraction"] = metrics["dead_fraction_eval"]
    out: dict[str, Any] = {key: value for key, value in metrics.items() if key not in ("budgets", "lm")}
    budgets: dict[int, dict[str, float]] = {}
    raw_budgets = metrics.get("budgets") or metrics.get("per_budget") or {}
    items = raw_budgets.items() if isinstance(raw_budgets, Mapping) else ((b.get("k"), b) for b in raw_budgets)
    for budget, values in items:
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
    lm = metrics.get("lm") or metrics.get("lm_loss") or {}
    for key in ("ce_loss_recovered", "clean_loss", "spliced_loss", "ablated_loss", "delta_loss"):
        value = _number(metrics.get(key, lm.get(key) if isinstance(lm, Mapping) else None))
        out.pop(key, None)
        if value is not None:
            out[key] = value
    return out


def sae_metrics(metrics: Mapping[str, Any] | None, sae_folder: str | Path | None = None) -> dict[str, Any] | None:
    """One SAE's metrics out of a run's metrics.

    ``training/`` writes ``{"run": {...}, "saes": {name: {"path": ..., "budgets": ..., ...}}}``: the entry of the SAE
    saved in ``sae_folder`` (matched by folder name or path, or the only entry) is returned with ``"run"`` kept
    beside it. Any other dict is already one SAE's metrics and is returned as it is.
    """
    if not metrics or not isinstance(metrics.get("saes"), Mapping):
        return dict(metrics) if metrics else None
    entries = metrics["saes"]
    chosen = None
    if sae_folder is not None:
        folder = Path(sae_folder)
        for name, entry in entries.items():
            path = entry.get("path") if isinstance(entry, Mapping) else None
            if name == folder.name or (path and Path(path).resolve() == folder.resolve()):
                chosen = entry
                break
    if chosen is None and len(entries) == 1:
        chosen = next(iter(entries.values()))
    if chosen is None:
        return None
    return {"run": metrics.get("run") or {}, **chosen}


def read_run_metrics(run_dir: str | Path | None, sae_folder: str | Path | None = None) -> dict[str, Any] | None:
    """The metrics of the SAE in ``sae_folder`` (default ``run_dir``) from ``run_dir/metrics.json``; None if none."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or delete it before generating the card.") from None
    return sae_metrics(raw, sae_folder if sae_folder is not None else run_dir)


def find_plot(run_dir: str | Path | None) -> Path | None:
    """The run's EV/L0-vs-budget plot (``budget_curves.png`` and friends), if it made one."""
    if run_dir is None:
        return None
    for name in PLOT_NAMES:
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def _read_command(run_dir: str | Path | None) -> str | None:
    if run_dir is None:
        return None
    for name in ("command.txt", "command.sh"):
        path = Path(run_dir) / name
        if path.is_file():
            return path.read_text().strip() or None
    return None


# ------------------------------------------------------------------------------------------------ describing
def architecture_name(config) -> str:
    """Human name of the SAE's architecture/objective."""
    if config.model_type == "jumprelu_sae":
        return "JumpReLU"
    if config.model_type == "kron_sae":
        return "KronSAE (HierarchicalTopK)" if config.hierarchical else "KronSAE (TopK)"
    return "HierarchicalTopK" if config.hierarchical else "TopK"


def architecture_tags(config) -> list[str]:
    tags = [_ARCH_TAGS.get(config.model_type, config.model_type)]
    if config.model_type == "hierarchical_sae" and not config.hierarchical:
        tags = ["topk"]
    elif config.model_type == "kron_sae":
        tags.append("hierarchical-topk" if config.hierarchical else "topk")
    return tags


def _objective(config) -> str:
    budgets = f"budgets {config.budgets}" if config.budgets else f"every budget 1..{config.k}"
    if config.model_type == "jumprelu_sae":
        return (
            "JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): acts = ReLU(pre)·1[pre > θ] with a learned "
            "per-latent threshold θ, pre = x·W_enc + b_enc"
            + (" with b_dec subtracted from x first" if config.apply_b_dec_to_input else "")
            + ". It was not trained by hf-sae but converted exactly from its source"
            + (f" ({config.source_format}: `{config.source}`)" if config.source else "")
            + f"; `encode` returns at most k = {config.k} active latents per token"
            + (" (all of them)." if config.k == config.d_sae else ".")
        )
    if config.model_type == "kron_sae":
        encoder = (
            f"KronSAE encoder (Kurochkin et al. 2025, arXiv 2505.22255): {config.num_heads} heads of "
            f"{config.base_dim}×{config.ext_dim} latents, each the mAND of a base and an extension pre-activation "
            f"({config.kron_activation}); "
        )
    else:
        encoder = "TopK encoder (Gao et al. 2024): a = ReLU(W_encᵀ(x − b_dec) + b_enc), the k largest kept; "
    if config.hierarchical:
        loss = (
            f"trained with the HierarchicalTopK objective (Balagansky et al. 2025, arXiv 2505.24473): the mean of the "
            f"reconstruction MSE at {budgets}, so every prefix budget k' ≤ {config.k} of the sorted latents is a "
            "good SAE"
        )
    else:
        loss = f"trained with the plain TopK reconstruction MSE at k = {config.k}"
    if config.auxk:
        loss += f", plus AuxK on dead latents (coefficient {config.auxk_coefficient:g})"
    return encoder + loss + ". Decoder rows are kept unit-norm during training."


def _default_name(config) -> str:
    base = (config.base_model or "sae").rstrip("/").split("/")[-1]
    layer = f"-l{config.hook_layer}" if config.hook_layer is not None else ""
    return f"{base}-{config.hook_site}{layer}-{architecture_tags(config)[0]}-{config.d_sae}"


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
    if config.model_type != "jumprelu_sae":
        lines.append("top8 = sae.encode(x, k=8)      # the first 8 of the same ranking: a smaller budget")
    lines += [
        "x_hat = sae.decode(latents)    # (4, d_in) reconstruction",
        "",
        "# steer the model with feature 1234 on every token, prefill and generation",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        'inputs = tokenizer("The weather today is", return_tensors="pt")',
        "out = sae.steer(model, {1234: 8.0}).generate(**inputs, max_new_tokens=40)",
        "print(tokenizer.decode(out[0]))",
    ]
    return "\n".join(lines)


def _limitations(config, metrics: Mapping[str, Any]) -> list[str]:
    items = []
    base = (config.base_model or "").lower()
    if metrics.get("quantized") or any(tag in base for tag in ("gguf", "q4_", "q4-", "q8_", "-int4", "-int8")):
        items.append(
            f"Trained on activations of a quantised model ({config.base_model}); the full-precision model's "
            "activations differ slightly, so expect a small drop in reconstruction quality on them."
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
    if config.model_type == "jumprelu_sae":
        items.append(
            "hf-sae does not train JumpReLU SAEs: `forward` returns the reconstruction MSE only, and the "
            "threshold gets no gradient."
        )
    tokens = metrics.get("tokens_trained") or config.tokens_trained
    if tokens and tokens < 100_000_000 and config.model_type != "jumprelu_sae":
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
    results = []
    for budget, entry in metrics["budgets"].items():
        for key, label in (("explained_variance", "EV"), ("fvu", "FVU")):
            if key in entry:
                results.append(
                    EvalResult(
                        metric_type=key,
                        metric_name=f"{label} @ k={budget}",
                        metric_value=round(entry[key], 6),
                        metric_config=f"k={budget}",
                        **common,
                    )
                )
    at_k = metrics["budgets"].get(config.k, {})
    for key, label in (("l0", "L0"), ("dead_fraction", "dead fraction")):
        if key in at_k:
            results.append(
                EvalResult(
                    metric_type=key,
                    metric_name=f"{label} @ k={config.k}",
                    metric_value=round(at_k[key], 6),
                    metric_config=f"k={config.k}",
                    **common,
                )
            )
    if "ce_loss_recovered" in metrics:
        results.append(
            EvalResult(
                metric_type="ce_loss_recovered",
                metric_name="CE loss recovered",
                metric_value=round(metrics["ce_loss_recovered"], 6),
                **common,
            )
        )
    return results


def _facts(config, metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    facts = [("architecture", f"{architecture_name(config)} (`{config.model_type}`)")]
    if config.base_model:
        facts.append(("base model", f"`{config.base_model}`"))
    facts.append(
        (
            "hook site",
            f"`{config.hook_site}`" + (f" of layer {config.hook_layer}" if config.hook_layer is not None else ""),
        )
    )
    facts += [("d_in", f"{config.d_in:,}"), ("width d_sae", f"{config.d_sae:,}"), ("k", str(config.k))]
    if config.model_type == "kron_sae":
        facts.append(("Kronecker heads", f"{config.num_heads} × ({config.base_dim}×{config.ext_dim})"))
    if config.hierarchical:
        budgets = ", ".join(map(str, config.budgets)) if config.budgets else f"every k' in 1..{config.k}"
        facts.append(("budgets", budgets))
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
) -> ModelCard:
    """The model card of one SAE (a ``huggingface_hub.ModelCard``; ``card.save(path)`` writes README.md).

    Args:
        sae: an hf-sae model (or its config).
        metrics: the run's metrics (schema in the module docstring); default ``run_dir/metrics.json``.
        run_dir: the run folder: metrics.json, the plot (``budget_curves.png``) and ``command.txt`` are read from it.
        command: the command that trained the SAE (a string or an argv list); default ``metrics["command"]``.
        repo_id, subfolder: where the SAE will live, for the usage snippet.
        license: the card's license; default ``metrics["license"]`` or apache-2.0.
        limitations: extra limitation lines.
        plot: the file name of the plot inside the repo; default the name of the run's plot, if any.
        tags: extra YAML tags (after ``sparse-autoencoder``, ``hf-sae``, the architecture and the site).
    """
    import hf_sae

    config = getattr(sae, "config", sae)
    metrics = read_run_metrics(run_dir) if metrics is None else sae_metrics(metrics, run_dir)
    has_metrics = bool(metrics)
    metrics = normalize_metrics(metrics, config.k)
    command = _as_command(command) or metrics.get("command") or _read_command(run_dir)
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
        license=license or metrics.get("license") or DEFAULT_LICENSE,
        tags=list(
            dict.fromkeys(["sparse-autoencoder", "hf-sae", *architecture_tags(config), config.hook_site, *(tags or [])])
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
    layer_text = f"layer {config.hook_layer}" if config.hook_layer is not None else "a layer"
    base_text = f"`{config.base_model}`" if config.base_model else "its language model"
    title = f"{architecture_name(config)} SAE for {config.base_model or 'a language model'}"
    title += f", {layer_text} {config.hook_site}" if config.hook_layer is not None else f", {config.hook_site}"
    summary = (
        f"A sparse autoencoder (SAE) with {config.d_sae:,} latents over the {_SITE_WORDS.get(config.hook_site, '')} "
        f"{layer_text} of {base_text}"
        + (f", k = {config.k} active latents per token" if config.model_type != "jumprelu_sae" else "")
        + (f", trained on {int(t):,} tokens" if (t := metrics.get("tokens_trained") or config.tokens_trained) else "")
        + ". It is a plain `transformers` model: weights in `model.safetensors`, every hyperparameter in "
        "`config.json`, loadable with `AutoModel.from_pretrained` once `hf_sae` is imported."
    )
    source_note = None
    if config.model_type == "jumprelu_sae" and config.source:
        source_note = f"Converted from {config.source_format or 'its source format'}: `{config.source}`."
    config_json = json.dumps(config.to_diff_dict(), indent=2, sort_keys=True, default=str)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(CARD_TEMPLATE)),
        hf_sae_version=hf_sae.__version__,
        has_metrics=has_metrics,
        title=title,
        summary=summary,
        facts=_facts(config, metrics),
        source_note=source_note,
        usage=_usage(config, repo_id, subfolder),
        is_nested=config.hierarchical,
        k=config.k,
        metrics_table=_metrics_table(metrics["budgets"]) if metrics["budgets"] else None,
        eval_description=eval_description,
        ce_text=ce_text,
        plot=plot,
        objective=_objective(config),
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
) -> ModelCard:
    """The root card of a collection repo: one row per SAE subfolder (``layer_{L}/{site}``) with its key numbers.

    ``saes`` maps subfolder -> SAE (or config); ``metrics`` maps subfolder -> that SAE's metrics.
    """
    import hf_sae

    metrics = metrics or {}
    configs = {sub: getattr(sae, "config", sae) for sub, sae in saes.items()}
    rows = [
        "| subfolder | architecture | layer | site | d_sae | k | EV @ k | L0 @ k | CE loss recovered |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    tags, base_models, datasets, results = {"sparse-autoencoder", "hf-sae"}, set(), set(), []
    for sub, config in configs.items():
        m = normalize_metrics(metrics.get(sub), config.k)
        at_k = m["budgets"].get(config.k, {})
        rows.append(
            f"| [`{sub}`]({sub}) | {architecture_name(config)} | "
            f"{config.hook_layer if config.hook_layer is not None else '–'} | {config.hook_site} | {config.d_sae:,} | "
            f"{config.k} | {_fmt(at_k.get('explained_variance'))} | {_fmt(at_k.get('l0'), 1)} | "
            f"{_fmt(m.get('ce_loss_recovered'))} |"
        )
        tags.update(architecture_tags(config))
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
        license=license or DEFAULT_LICENSE,
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
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(COLLECTION_TEMPLATE)),
        hf_sae_version=hf_sae.__version__,
        title=f"SAE collection: {name}",
        summary=summary,
        index_table="\n".join(rows),
        usage=usage,
        limitations=[*(limitations or [])],
    )
    return _tidy(card)


def _tidy(card: ModelCard) -> ModelCard:
    """Collapse the blank lines the template's optional blocks leave behind."""
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content).rstrip() + "\n")
