"""Synthetic ground truth (issue 18 item 5): every hf-sae architecture and SAELens's own BatchTopK and Matryoshka
trainers on the same SynthSAEBench-style data (Chanin et al., "SynthSAEBench", arXiv 2602.14687), scored against the
known feature dictionary by one metric implementation.

Stages (each skipped when its outputs exist, so a rerun resumes):

1. generate (SAELens's venv, ``sae_lens.synthetic``): a SyntheticModel (Zipfian firing, hierarchy with mutually
   exclusive children, low-rank correlations, SynthSAEBench-16k's magnitude laws, scaled down: ``GENERATOR``), then
   ``--samples`` training activations and ``--heldout`` held-out activations with their true feature activations,
   written to ``runs/synthetic/seed<seed>-n<samples>/`` (.npy; the ground-truth dictionary as
   ``feature_vectors.npy``, the hierarchy as ``hierarchy.json``).
2. ours: TopK at each k of ``--topk-ks``, HierarchicalTopK at K, KronSAE (centred encoder), BatchTopK, Matryoshka
   BatchTopK and JumpReLU, each trained by ``experiments/common.train_sae`` (the training CLI's recipe) on exactly
   those rows, built by architecture name through ``hf_sae.registry``.
3. SAELens (its venv, its ``SAETrainer``): BatchTopK and Matryoshka BatchTopK on the same rows, same batch size,
   sample count, peak learning rate and warm-up + cosine schedule, and once more with the defaults of SAELens's
   ``SyntheticSAERunnerConfig`` (lr 3e-4, constant); saved with ``save_inference_model`` and read back by
   ``hf_sae.convert.from_sae_lens``. In its venv each is also scored by sae_lens's own
   ``mean_correlation_coefficient`` / ``compute_classification_metrics`` on the first ``CROSS_CHECK_ROWS`` held-out
   rows, as a check of this file's metric code.
4. evaluate: every SAE (ours and SAELens's, converted) with this file's metrics on the held-out set, at its k and,
   for HierarchicalTopK and for the largest TopK (truncated), at every k' of ``--topk-ks``.

Metrics (the definitions of SynthSAEBench / ``sae_lens.synthetic.evals``, implemented here, tested in
tests/test_synthetic.py): MCC = mean |cos| of the optimal one-to-one matching (Hungarian) of decoder rows to
ground-truth directions; F1 = mean over latents of the F1 of "latent fires" as a detector of "its best-|cos| true
feature fires" (dead latents count 0); EV = 1 − Σ||x − x̂||² / Σ||x − mean x||²; L0; dead = fraction of latents that
never fire on the held-out set.

    python experiments/synthetic.py --seed 0                         # 4,194,304 samples: generate, train, report
    python experiments/synthetic.py --only ours &                   # or share the training between processes,
    python experiments/synthetic.py --only saelens; wait            # one per core, then the plain call evaluates
    python experiments/synthetic.py --samples 10485760 --data-from runs/synthetic/seed0-n4194304 \
        --variants topk_k4 topk_k8 ...                             # a longer run of some SAEs on the same rows

(At 4,194,304 samples on this shared 2-core CPU: 751 s generation, ~6,100 s of training in all, ~1 h wall-clock
with two workers; ``--report-only`` rewrites the docs section and the plot from the results JSON.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = Path.home() / ".cache" / "hf_sae" / "peer-venvs" / "saelens" / "bin" / "python"
CROSS_CHECK_ROWS = 16384
# SAE initialisation seeds = seed + INIT_SEED_OFFSET. The generator's FeatureDictionary draws its directions with
# torch.randn under the run's seed; an SAE initialised by normal_ under the same global seed would start with its
# decoder rows equal to the ground truth (measured: MCC 0.995 before training).
INIT_SEED_OFFSET = 1000

# SynthSAEBench-16k (16,384 features in d 768; Zipf exponent 0.5, p in [5e-4, 0.4]; 128 roots x branching 4, depth
# 3, all children mutually exclusive; low-rank correlation rank 25 scale 0.1; mean magnitude 5 -> 4, std folded
# normal (0.5, 0.5)), scaled to this CPU: 2,048 features in d 128 (the same 16x superposition), 16 roots, p_min 1e-2
# (the smaller dictionary would otherwise have a true L0 of ~4). No orthogonalisation step (160 s for 4k features).
GENERATOR = {
    "num_features": 2048,
    "hidden_dim": 128,
    "zipf_exponent": 0.5,
    "max_prob": 0.4,
    "min_prob": 1e-2,
    "hierarchy_roots": 16,
    "branching_factor": 4,
    "max_depth": 3,
    "mutually_exclusive_portion": 1.0,
    "correlation_rank": 25,
    "correlation_scale": 0.1,
    "mean_magnitude": [5.0, 4.0],
    "std_magnitude": [0.5, 0.5],
}


# ------------------------------------------------------------------------------------------------ the metrics
def abs_cosines(decoder: Tensor, features: Tensor) -> Tensor:
    """|cos| between every decoder row (d_sae, d) and every true direction (n_features, d): (d_sae, n_features)."""
    a = torch.nn.functional.normalize(decoder.double(), dim=-1)
    b = torch.nn.functional.normalize(features.double(), dim=-1)
    return (a @ b.T).abs()


def match_features(cosines: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one matching of latents to true features of largest total |cos| (Hungarian algorithm; min(d_sae,
    n_features) pairs): (latent ids, feature ids)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(1.0 - cosines.cpu().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


def mcc(cosines: Tensor) -> float:
    """Mean correlation coefficient: the mean |cos| over the optimal one-to-one matching (SynthSAEBench; SAELens's
    ``mean_correlation_coefficient``)."""
    rows, cols = match_features(cosines)
    return float(cosines[rows, cols].mean())


def detection_counts(
    latent_rows: Tensor, latent_ids: Tensor, feature_fires: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """Per latent: how often it fires, and how often it fires together with its target feature.

    latent_rows, latent_ids: (M,) one entry per (row, latent) firing; feature_fires: (N, n_features) bool, the true
    features firing; target: (d_sae,) the feature each latent is scored against. Returns (fires, true positives),
    both (d_sae,) float64.
    """
    d_sae = target.shape[0]
    fires = torch.bincount(latent_ids, minlength=d_sae).double()
    hits = feature_fires[latent_rows, target[latent_ids]].double()
    true_positives = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, latent_ids, hits)
    return fires, true_positives


def f1_scores(fires: Tensor, true_positives: Tensor, target_fires: Tensor) -> dict[str, Tensor]:
    """Per latent precision TP/(TP+FP), recall TP/(TP+FN), F1 (0 where undefined, as ``sae_lens``); target_fires:
    (d_sae,) how often each latent's target feature fires."""
    precision = torch.where(fires > 0, true_positives / fires.clamp_min(1), 0.0)
    recall = torch.where(target_fires > 0, true_positives / target_fires.clamp_min(1), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-300), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def ground_truth_metrics(
    cosines: Tensor, latent_rows: Tensor, latent_ids: Tensor, feature_fires: Tensor, groups: dict[str, Tensor]
) -> dict[str, float]:
    """MCC, mean precision / recall / F1 over latents (each against its best-|cos| feature), and per group of true
    features (``groups``: name -> feature ids, e.g. hierarchy parents / children) the mean |cos| and F1 of the latent
    the one-to-one matching assigns to each feature of the group."""
    best = cosines.argmax(1)
    counts = feature_fires.sum(0).double()
    fires, true_positives = detection_counts(latent_rows, latent_ids, feature_fires, best)
    scores = f1_scores(fires, true_positives, counts[best])
    out = {"mcc": mcc(cosines), **{name: float(value.mean()) for name, value in scores.items()}}
    if groups:
        rows, cols = match_features(cosines)
        target = torch.zeros(cosines.shape[0], dtype=torch.long)
        target[rows] = cols
        fires_m, tp_m = detection_counts(latent_rows, latent_ids, feature_fires, target)
        matched_f1 = f1_scores(fires_m, tp_m, counts[target])["f1"]
        latent_of = torch.full((cosines.shape[1],), -1, dtype=torch.long)
        latent_of[cols] = rows
        for name, features in groups.items():
            latents = latent_of[features]
            kept = latents >= 0
            out[f"mcc_{name}"] = float(cosines[latents[kept], features[kept]].sum() / max(len(features), 1))
            out[f"f1_{name}"] = float(matched_f1[latents[kept]].sum() / max(len(features), 1))
    return out


# ---------------------------------------------------------------------------- stage 1 and 3: in SAELens's venv
def saelens_model(params: dict, seed: int):
    from sae_lens.synthetic import (
        HierarchyConfig,
        LowRankCorrelationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )
    from sae_lens.synthetic.firing_magnitudes import FoldedNormalMagnitudeConfig, LinearMagnitudeConfig

    config = SyntheticModelConfig(
        num_features=params["num_features"],
        hidden_dim=params["hidden_dim"],
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=params["zipf_exponent"], max_prob=params["max_prob"], min_prob=params["min_prob"]
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=params["hierarchy_roots"],
            branching_factor=params["branching_factor"],
            max_depth=params["max_depth"],
            mutually_exclusive_portion=params["mutually_exclusive_portion"],
        ),
        correlation=LowRankCorrelationConfig(
            rank=params["correlation_rank"], correlation_scale=params["correlation_scale"]
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(*params["mean_magnitude"]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(*params["std_magnitude"]),
        seed=seed,
    )
    return SyntheticModel(config)


def hierarchy_groups(hierarchy) -> dict[str, list[int]]:
    """Feature ids of the hierarchy's roots, of its inner parents (have a parent and children), of its leaves
    (children without children)."""
    groups: dict[str, list[int]] = {"roots": [], "inner": [], "leaves": []}

    def walk(node, depth):
        if node.feature_index is not None:
            kind = "roots" if depth == 0 else ("inner" if node.children else "leaves")
            groups[kind].append(int(node.feature_index))
        for child in node.children:
            walk(child, depth + 1)

    for root in hierarchy.roots:
        walk(root, 0)
    return groups


def replace_json(path: Path, data: dict) -> None:
    """Write a stage's marker JSON by rename (temp file in the same folder, fsync, os.replace): a stage killed
    mid-write leaves no marker, so the rerun redoes it. The venv stages cannot import hf_sae._io (no hf_sae
    there); outside them the script uses experiments.common.write_json."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def venv_generate(folder: Path, params: dict, samples: int, heldout: int, seed: int) -> None:
    """Stage 1 (SAELens's venv): the model, the training rows, the held-out rows and their true features."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = saelens_model(params, seed)
    model.save(folder / "synthetic_model")
    chunk = 65536
    shape = (samples, params["hidden_dim"])
    train = np.lib.format.open_memmap(folder / "train.tmp.npy", mode="w+", dtype=np.float32, shape=shape)
    with torch.no_grad():
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            train[start : start + n] = model.feature_dict(model.activation_generator.sample(n)).numpy()
            print(f"generate: {start + n:,}/{samples:,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
        train.flush()
        del train
        features = model.activation_generator.sample(heldout)
        x = model.feature_dict(features)
    rows, cols = features.nonzero(as_tuple=True)
    np.save(folder / "heldout_x.npy", x.numpy())
    np.save(folder / "heldout_feature_rows.npy", rows.numpy().astype(np.int32))
    np.save(folder / "heldout_feature_ids.npy", cols.numpy().astype(np.int32))
    np.save(folder / "heldout_feature_values.npy", features[rows, cols].numpy())
    np.save(folder / "feature_vectors.npy", model.feature_dict.feature_vectors.detach().numpy())
    replace_json(folder / "hierarchy.json", hierarchy_groups(model.hierarchy))
    true_l0 = float((features > 0).sum(1).double().mean())
    stats = {"params": params, "seed": seed, "samples": samples, "heldout": heldout, "true_l0_heldout": true_l0}
    import sae_lens

    stats["sae_lens_version"] = sae_lens.__version__
    stats["firing_probability_sum"] = float(model.activation_generator.firing_probabilities.sum())
    stats["seconds"] = time.perf_counter() - started
    os.replace(folder / "train.tmp.npy", folder / "train.npy")
    replace_json(folder / "generator.json", stats)
    print(f"generate: done, true L0 {true_l0:.2f} ({stats['seconds']:.0f} s)", flush=True)


class RowBatches:
    """The training rows of train.npy in a seeded random order, ``batch_size`` at a time (SAELens's DataProvider)."""

    def __init__(self, data: np.ndarray, batch_size: int, seed: int):
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(data), generator=self.generator), 0

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.data), generator=self.generator), 0
        rows = np.sort(self.order[self.position : self.position + self.batch_size].numpy())
        self.position += self.batch_size
        return torch.from_numpy(np.ascontiguousarray(self.data[rows]))


def venv_train(folder: Path, spec: dict) -> None:
    """Stage 3 (SAELens's venv): train one SAELens BatchTopK / Matryoshka BatchTopK with SAELens's SAETrainer on
    train.npy, save it, and score it with sae_lens's own synthetic metrics on the first held-out rows."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.synthetic import compute_classification_metrics, mean_correlation_coefficient
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(spec["seed"] + INIT_SEED_OFFSET)
    data = np.load(folder / "train.npy", mmap_mode="r")
    common = dict(d_in=data.shape[1], d_sae=spec["d_sae"], k=spec["k"], dtype="float32", device="cpu")
    if spec["arch"] == "matryoshka_batchtopk":
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=spec["widths"], **common)
        )
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    steps = math.ceil(spec["samples"] / spec["batch_size"])
    trainer_config = SAETrainerConfig(
        total_training_samples=steps * spec["batch_size"],
        train_batch_size_samples=spec["batch_size"],
        lr=spec["lr"],
        lr_end=spec["lr_end"],
        lr_scheduler_name=spec["schedule"],
        lr_warm_up_steps=int(spec["warmup_fraction"] * steps),
        lr_decay_steps=0,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    started = time.perf_counter()
    trainer = SAETrainer(
        cfg=trainer_config,
        sae=sae,
        data_provider=RowBatches(data, spec["batch_size"], spec["seed"]),
        save_checkpoint_fn=lambda path: None,
    )
    sae = trainer.fit()
    seconds = time.perf_counter() - started
    out = Path(spec["out"])
    sae.save_inference_model(str(out))
    # sae_lens's own synthetic metrics on the first held-out rows (cross-check of this file's implementation)
    x = torch.from_numpy(np.load(folder / "heldout_x.npy")[:CROSS_CHECK_ROWS])
    n_rows = x.shape[0]
    rows = torch.from_numpy(np.load(folder / "heldout_feature_rows.npy")).long()
    ids = torch.from_numpy(np.load(folder / "heldout_feature_ids.npy")).long()
    features = torch.from_numpy(np.load(folder / "feature_vectors.npy"))
    feature_acts = torch.zeros(n_rows, features.shape[0])
    keep = rows < n_rows
    feature_acts[rows[keep], ids[keep]] = 1.0
    inference = SAE.load_from_disk(str(out))  # what is published (a JumpReLU with the learnt threshold)
    with torch.no_grad():
        latents = inference.encode(x)
        metrics = compute_classification_metrics(latents, feature_acts, inference.W_dec, features)
        check = {
            "mcc": mean_correlation_coefficient(inference.W_dec, features),
            "l0": float((latents != 0).sum(-1).double().mean()),
            "f1": metrics.f1_score,
            "precision": metrics.precision,
            "recall": metrics.recall,
            "rows": n_rows,
        }
    replace_json(out / "hf_sae_run.json", {"seconds": seconds, "steps": steps, "sae_lens_metrics": check})
    print(f"{spec['name']}: trained in {seconds:.0f} s; sae_lens metrics {check}", flush=True)


# ------------------------------------------------------------------------------------- stages 2 and 4: hf-sae
def chosen(args, variants: list[dict]) -> list[dict]:
    """The variants ``--variants`` names (all of them without it)."""
    return [v for v in variants if not args.variants or v["name"] in args.variants]


def our_variants(args) -> list[dict]:
    """name, architecture name for hf_sae.registry, config fields, and the budgets k' it is evaluated at."""
    k_max, k = max(args.topk_ks), args.k
    heads = args.d_sae // 8
    variants = [
        dict(name=f"topk_k{kk}", arch="topk", config=dict(k=kk), budgets=[kk] if kk != k_max else args.topk_ks)
        for kk in args.topk_ks
    ]
    variants += [
        dict(name=f"hierarchical_k{k_max}", arch="hierarchical", config=dict(k=k_max), budgets=args.topk_ks),
        dict(name=f"kron_k{k}", arch="kron", config=dict(k=k, num_heads=heads, base_dim=2, ext_dim=4), budgets=[k]),
        dict(name=f"batchtopk_k{k}", arch="batchtopk", config=dict(k=k), budgets=[None]),
        dict(name=f"matryoshka_k{k}", arch="matryoshka", config=dict(k=k), budgets=[None]),
        dict(name="jumprelu", arch="jumprelu", config=dict(l0_coefficient=args.jumprelu_l0), budgets=[None]),
    ]
    return variants


def saelens_variants(args) -> list[dict]:
    from hf_sae.configuration_matryoshka_sae import doubling_group_sizes

    widths = list(np.cumsum(doubling_group_sizes(args.d_sae)).tolist())
    k = args.k
    # recipe "ours": our peak lr, warm-up and cosine; "defaults": SyntheticSAERunnerConfig's lr 3e-4, constant
    return [
        dict(name=f"saelens_batchtopk_k{k}", arch="batchtopk", widths=None, recipe="ours", budgets=[None]),
        dict(
            name=f"saelens_matryoshka_k{k}", arch="matryoshka_batchtopk", widths=widths, recipe="ours", budgets=[None]
        ),
        dict(name=f"saelensdefaults_batchtopk_k{k}", arch="batchtopk", widths=None, recipe="defaults", budgets=[None]),
        dict(
            name=f"saelensdefaults_matryoshka_k{k}",
            arch="matryoshka_batchtopk",
            widths=widths,
            recipe="defaults",
            budgets=[None],
        ),
    ]


def run_in_venv(args, stage: str, payload: dict) -> None:
    command = [str(args.saelens_python), str(Path(__file__).resolve()), "--venv-stage", stage, json.dumps(payload)]
    print(f"+ (SAELens venv) {stage} {payload.get('name', '')}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"})


@contextmanager
def claimed(out: Path, done: str, wait: bool) -> Iterator[bool]:
    """Claim the SAE folder ``out`` for this process with a lock file beside it, so that several processes can share
    one run's SAEs. Yields whether this process should train it: not already done (``out / done`` exists) and not
    being trained by another process. ``wait``: block until another process's claim ends (the final call, which
    must evaluate every SAE) instead of skipping that SAE."""
    from filelock import FileLock, Timeout

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield not (out / done).exists()
    finally:
        lock.release()


def train_ours(args, folder: Path, data: Tensor) -> None:
    for v in chosen(args, our_variants(args)):
        out = folder / "saes" / v["name"]
        with claimed(out, "train.json", wait=not args.only) as mine:
            if mine:
                train_one_of_ours(args, v, out, data)


def train_one_of_ours(args, v: dict, out: Path, data: Tensor) -> None:
    from experiments.common import seed_everything, train_sae, write_json
    from hf_sae.registry import resolve_architecture

    seed_everything(args.seed + INIT_SEED_OFFSET)
    architecture, preset = resolve_architecture(v["arch"])
    # fields whose default depends on the run's length (JumpReLU's λ warm-up), as training/saes.py fills them
    steps = math.ceil(args.samples / args.batch_size)
    run_defaults = architecture.model_class.run_defaults(steps)
    fields = {**run_defaults, **v["config"]}
    config = architecture.build_config(preset, d_in=data.shape[1], d_sae=args.d_sae, **fields)
    sae = architecture.model_class(config)
    timing = train_sae(sae, data, args.samples, batch_size=args.batch_size, seed=args.seed, name=v["name"])
    sae.save_pretrained(out)
    write_json(out / "train.json", {**timing, "lr": sae.default_learning_rate(config)})


# SAELens's SAETrainerConfig: warm-up, then the main schedule (cosine to lr_end), then lr_decay_steps of linear
# decay from lr_end; no linear decay here (it would start at lr_end = 1e-6 right after the warm-up).
OUR_SCHEDULE = {"lr_end": 1e-6, "warmup_fraction": 0.1, "schedule": "cosineannealing"}
SAELENS_DEFAULTS = {"lr": 3e-4, "lr_end": 3e-5, "warmup_fraction": 0.0, "schedule": "constant"}  # SyntheticSAERunner


def train_saelens(args, folder: Path) -> None:
    from hf_sae.registry import resolve_architecture

    architecture, preset = resolve_architecture("batchtopk")
    lr = architecture.model_class.default_learning_rate(
        architecture.build_config(preset, d_in=GENERATOR["hidden_dim"], d_sae=args.d_sae, k=args.k)
    )
    for v in chosen(args, saelens_variants(args)):
        out = folder / "saes" / v["name"]
        with claimed(out, "hf_sae_run.json", wait=not args.only) as mine:
            if mine:
                train_one_of_saelens(args, folder, v, out, lr)


def train_one_of_saelens(args, folder: Path, v: dict, out: Path, lr: float) -> None:
    spec = dict(
        name=v["name"],
        arch=v["arch"],
        widths=v["widths"],
        d_sae=args.d_sae,
        k=args.k,
        samples=args.samples,
        batch_size=args.batch_size,
        **(OUR_SCHEDULE | {"lr": lr} if v["recipe"] == "ours" else SAELENS_DEFAULTS),
        seed=args.seed,
        out=str(out),
    )
    run_in_venv(args, "train", {"folder": str(folder), "spec": spec})


class HeldOut:
    """The held-out rows (x: (N, d)), which true features fire on them ((N, n_features) bool), the dictionary."""

    def __init__(self, folder: Path, n_rows: int | None = None):
        self.x = torch.from_numpy(np.load(folder / "heldout_x.npy")[:n_rows])
        rows = torch.from_numpy(np.load(folder / "heldout_feature_rows.npy")).long()
        ids = torch.from_numpy(np.load(folder / "heldout_feature_ids.npy")).long()
        rows, ids = rows[rows < self.x.shape[0]], ids[rows < self.x.shape[0]]
        self.features = torch.from_numpy(np.load(folder / "feature_vectors.npy"))
        self.fires = torch.zeros(self.x.shape[0], self.features.shape[0], dtype=torch.bool)
        self.fires[rows, ids] = True
        self.groups = {name: torch.tensor(ids_, dtype=torch.long) for name, ids_ in feature_groups(folder).items()}


def feature_groups(folder: Path) -> dict[str, list[int]]:
    """The hierarchy's features by role (hierarchy.json: roots, inner, leaves) plus parents = roots + inner."""
    groups = json.loads((folder / "hierarchy.json").read_text())
    return groups | {"parents": groups["roots"] + groups["inner"]}


@torch.no_grad()
def evaluate(sae, held_out: HeldOut, budget: int | None, chunk: int = 8192) -> dict[str, float]:
    """This file's metrics of ``sae`` on the held-out set at budget k' (None: the SAE's own encode, e.g. a
    BatchTopK threshold)."""
    from hf_sae.metrics import explained_variance

    rows, ids, reconstructions, active = [], [], [], 0
    for start in range(0, held_out.x.shape[0], chunk):
        x = held_out.x[start : start + chunk]
        latents = sae.encode(x)
        if budget is not None:
            latents = latents.truncate(budget)
        reconstructions.append(sae.decode(latents))
        fired = latents.values > 0
        row, slot = fired.nonzero(as_tuple=True)
        rows.append(row + start)
        ids.append(latents.indices[row, slot])
        active += int(fired.sum())
    rows, ids = torch.cat(rows), torch.cat(ids)
    cosines = abs_cosines(sae.W_dec.detach(), held_out.features)
    out = ground_truth_metrics(cosines, rows, ids, held_out.fires, held_out.groups)
    d_sae = sae.config.d_sae
    out["explained_variance"] = explained_variance(held_out.x, torch.cat(reconstructions))
    out["l0"] = active / held_out.x.shape[0]
    out["dead_fraction"] = 1.0 - torch.unique(ids).numel() / d_sae
    return out


def load_sae(folder: Path, name: str):
    from hf_sae.convert import from_sae_lens
    from hf_sae.loading import load_sae as load_pretrained

    path = folder / "saes" / name
    return from_sae_lens(path) if name.startswith("saelens") else load_pretrained(path)


def evaluate_all(args, folder: Path, results: dict, results_path: Path) -> None:
    from experiments.common import write_json

    held_out, first_rows = HeldOut(folder), HeldOut(folder, CROSS_CHECK_ROWS)
    if "random_decoder_mcc" not in results:  # chance level: the MCC of d_sae random directions
        generator = torch.Generator().manual_seed(args.seed + INIT_SEED_OFFSET + 1)
        random_decoder = torch.randn(args.d_sae, held_out.features.shape[1], generator=generator)
        results["random_decoder_mcc"] = mcc(abs_cosines(random_decoder, held_out.features))
    for v in chosen(args, [*our_variants(args), *saelens_variants(args)]):
        sae = None
        cross_check = ["cross_check"] if v["name"].startswith("saelens") else []
        for budget in [*v["budgets"], *cross_check]:
            key = f"{v['name']}@{budget if budget is not None else 'own'}"
            if key in results["evaluations"]:
                continue
            sae = sae or load_sae(folder, v["name"]).eval()
            started = time.perf_counter()
            if budget == "cross_check":  # the SAELens SAE on the rows its venv scored it on, by this file's code
                metrics = evaluate(sae, first_rows, None)
            else:
                metrics = evaluate(sae, held_out, budget)
            metrics |= {"sae": v["name"], "budget": budget, "seconds": time.perf_counter() - started}
            results["evaluations"][key] = metrics
            print(f"eval {key}: " + ", ".join(f"{k} {val:.4f}" for k, val in metrics.items() if isinstance(val, float)))
            write_json(results_path, results)


DATA_FILES = (
    "train.npy",
    "heldout_x.npy",
    "heldout_feature_rows.npy",
    "heldout_feature_ids.npy",
    "heldout_feature_values.npy",
    "feature_vectors.npy",
    "hierarchy.json",
    "synthetic_model",
    "generator.json",  # last: its presence means the data is complete
)


def link_data(source: Path, folder: Path) -> None:
    """Link another run's generated data into ``folder`` (relative links; generator.json last)."""
    source = source.resolve()
    if not (source / "generator.json").exists():
        raise SystemExit(f"--data-from {source}: no generator.json there; pass a folder whose generation finished.")
    for name in DATA_FILES:
        target = folder / name
        if not target.exists():
            target.symlink_to(os.path.relpath(source / name, folder))


def training_rows(folder: Path) -> int:
    return int(np.load(folder / "train.npy", mmap_mode="r").shape[0])


def results_file(seed: int, samples: int) -> Path:
    return ROOT / "experiments" / "results" / f"synthetic_seed{seed}_n{samples}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2**22, help="training rows (every SAE sees all of them)")
    parser.add_argument("--heldout", type=int, default=65536)
    parser.add_argument("--d-sae", type=int, default=GENERATOR["num_features"])
    parser.add_argument("--k", type=int, default=16, help="k of KronSAE and the BatchTopK family")
    parser.add_argument("--topk-ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--jumprelu-l0", type=float, default=1e-3, help="JumpReLU's l0_coefficient λ")
    parser.add_argument("--out", type=Path, default=None, help="default runs/synthetic/seed<seed>-n<samples>")
    parser.add_argument("--saelens-python", type=Path, default=SAELENS_PYTHON)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--only",
        choices=("ours", "saelens"),
        help="train only this group's SAEs and stop; several such processes may run at once (each SAE is claimed "
        "by a lock file, one process per core), then a plain call waits for them, trains what is left, evaluates "
        "and reports",
    )
    parser.add_argument(
        "--data-from",
        type=Path,
        help="reuse the generated rows of another run's folder (linked, not copied) and train for --samples on them "
        "(several epochs when --samples exceeds its rows): a longer run on the same data and held-out set",
    )
    parser.add_argument("--variants", nargs="+", help="train and evaluate only these SAEs (names as in saes/)")
    parser.add_argument("--venv-stage", nargs=2, metavar=("STAGE", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.venv_stage:  # inside SAELens's venv: no hf_sae here
        stage, payload = args.venv_stage[0], json.loads(args.venv_stage[1])
        folder = Path(payload["folder"])
        if stage == "generate":
            venv_generate(folder, payload["params"], payload["samples"], payload["heldout"], payload["seed"])
        else:
            venv_train(folder, payload["spec"])
        return

    sys.path.insert(0, str(ROOT))
    from experiments.common import write_json

    args.topk_ks = sorted(args.topk_ks)
    folder = args.out or ROOT / "runs" / "synthetic" / f"seed{args.seed}-n{args.samples}"
    folder.mkdir(parents=True, exist_ok=True)
    results_path = results_file(args.seed, args.samples)
    started = time.perf_counter()
    if not args.report_only:
        if args.data_from and not (folder / "generator.json").exists():
            link_data(args.data_from, folder)
        if not (folder / "generator.json").exists():
            payload = dict(folder=str(folder), params=GENERATOR, samples=args.samples, heldout=args.heldout)
            run_in_venv(args, "generate", payload | {"seed": args.seed})
        rows = training_rows(folder)
        if rows < args.samples and not args.data_from:
            raise ValueError(f"{folder}/train.npy has {rows:,} rows, fewer than --samples {args.samples:,}")
        if args.only != "saelens":
            train_ours(args, folder, torch.from_numpy(np.load(folder / "train.npy")))
        if args.only != "ours":
            train_saelens(args, folder)
        if args.only:
            return
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.report_only and results.get("evaluations") and not (folder / "generator.json").exists():
        report(*primary_run(args, results))  # the run folder is gone (a fresh checkout): report from the JSON
        return
    if results.get("folder") != str(folder):  # another run's results (other samples or data): start afresh
        results = {}
    results["folder"] = str(folder)
    results.setdefault("evaluations", {})
    results["generator"] = json.loads((folder / "generator.json").read_text())
    results["groups"] = {name: len(ids) for name, ids in feature_groups(folder).items()}
    results["args"] = {key: str(value) for key, value in vars(args).items() if key != "venv_stage"}
    results["training"] = {
        path.parent.name: json.loads(path.read_text())
        for pattern in ("*/train.json", "*/hf_sae_run.json")
        for path in sorted((folder / "saes").glob(pattern))
    }
    if not args.report_only:
        evaluate_all(args, folder, results, results_path)
    results["seconds_this_call"] = time.perf_counter() - started
    write_json(results_path, results)
    report(*primary_run(args, results))


def primary_run(args, results: dict) -> tuple[argparse.Namespace, dict]:
    """The run the docs section shows in full: seed 0 at these samples when this is another seed's run and seed 0's
    results exist (the other seeds enter through :func:`seeds_text`), else this run."""
    path = results_file(0, args.samples)
    if args.seed == 0 or not path.exists():
        return args, results
    primary = json.loads(path.read_text())
    return argparse.Namespace(**(vars(args) | {"seed": 0, "out": None, "variants": None})), primary


# ------------------------------------------------------------------------------------------------ the report
LABELS = {
    "topk": "TopK",
    "hierarchical": "HierarchicalTopK",
    "kron": "KronSAE (2, 4), centred",
    "batchtopk": "BatchTopK",
    "matryoshka": "Matryoshka BatchTopK",
    "jumprelu": "JumpReLU",
    "saelens_batchtopk": "SAELens BatchTopK",
    "saelens_matryoshka": "SAELens Matryoshka BatchTopK",
    "saelensdefaults_batchtopk": "SAELens BatchTopK, SAELens defaults",
    "saelensdefaults_matryoshka": "SAELens Matryoshka BatchTopK, SAELens defaults",
}
COLUMNS = [
    ("L0", "l0"),
    ("EV", "explained_variance"),
    ("MCC", "mcc"),
    ("F1", "f1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("dead", "dead_fraction"),
    ("MCC roots", "mcc_roots"),
    ("MCC parents", "mcc_parents"),
    ("MCC leaves", "mcc_leaves"),
    ("F1 roots", "f1_roots"),
    ("F1 parents", "f1_parents"),
    ("F1 leaves", "f1_leaves"),
]


def family(name: str) -> str:
    return name.rsplit("_k", 1)[0] if "_k" in name else name


def row_label(metrics: dict, k_max: int) -> str:
    name, budget = metrics["sae"], metrics["budget"]
    label = LABELS[family(name)] + (f" k={name.rsplit('_k', 1)[1]}" if "_k" in name else "")
    if budget is None:
        return label + (" (threshold)" if family(name) != "jumprelu" else "")
    if name == f"topk_k{k_max}" and budget != k_max:
        return f"TopK k={k_max} truncated to k'={budget}"
    if family(name) == "hierarchical":
        return f"HierarchicalTopK K={k_max} at k'={budget}"
    return label


def table_rows(results: dict, k_max: int) -> list[list]:
    rows = []
    for m in results["evaluations"].values():
        if m["budget"] == "cross_check":
            continue
        seconds = results["training"].get(m["sae"], {}).get("seconds")
        rows.append(
            [row_label(m, k_max)]
            + [f"{m[c]:.2f}" if c == "l0" else m[c] for _, c in COLUMNS]
            + [f"{seconds:.0f}" if seconds is not None else "-"]
        )
    return rows


def runs_of_seed(args, results: dict) -> dict[int, dict]:
    """Every evaluated run of this seed by its training samples (``synthetic_seed<seed>_n*.json``), this one too."""
    runs = {}
    for path in (ROOT / "experiments" / "results").glob(f"synthetic_seed{args.seed}_n*.json"):
        other = json.loads(path.read_text())
        if other.get("evaluations"):
            runs[int(other["args"]["samples"])] = other
    runs[int(args.samples)] = results
    return dict(sorted(runs.items()))


def scale_rows(args, results: dict, k_max: int) -> tuple[list[str], list[list]]:
    """This run's SAEs at every sample count this seed has results for: EV, MCC and F1 per SAE and budget, smallest
    run first ("–" where a run did not train that SAE): does more data move the numbers?"""
    runs = runs_of_seed(args, results)
    headers = ["SAE"] + [f"{metric} at {n:,}" for metric in ("EV", "MCC", "F1") for n in runs]
    rows = []
    for key, m in results["evaluations"].items():
        if m["budget"] == "cross_check":
            continue
        cells = [
            run["evaluations"][key][metric] if key in run["evaluations"] else "–"
            for metric in ("explained_variance", "mcc", "f1")
            for run in runs.values()
        ]
        rows.append([row_label(m, k_max), *cells])
    return headers, rows


def longer_claims(args, results: dict) -> str:
    """The claims again for every run of this seed with more samples than this one (e.g. a subset of the SAEs
    trained for longer on the same rows)."""
    parts = []
    for samples, other in runs_of_seed(args, results).items():
        if samples <= int(args.samples):
            continue
        trained = sorted({m["sae"] for m in other["evaluations"].values()})
        parts.append(
            f"**The same claims at {samples:,} samples**{epochs_text(samples, other['generator'])}"
            f" (SAEs trained: {', '.join(trained)}):\n\n{claims(args, other)}\n"
        )
    return "\n".join(parts)


def value(results: dict, name: str, budget, metric: str) -> float | None:
    key = f"{name}@{budget if budget is not None else 'own'}"
    m = results["evaluations"].get(key)
    return None if m is None else m[metric]


def claims(args, results: dict) -> str:
    """Each paper claim beside the measurement, with the rule that decides the verdict."""
    ks, k_max, k = args.topk_ks, max(args.topk_ks), args.k
    chance = results["random_decoder_mcc"]
    best = max(m["mcc"] for m in results["evaluations"].values())
    lines = [
        f"- Chance level: a decoder of {args.d_sae} random directions has MCC {chance:.4f}; the best SAE here "
        f"{best:.4f}. Feature-recovery differences between SAEs whose MCC is near chance say little about the "
        "papers' claims, which are about trained-to-convergence SAEs."
    ]
    # 1. HierarchicalTopK vs separate TopK and truncated TopK
    hier, trunc = f"hierarchical_k{k_max}", f"topk_k{k_max}"
    gaps, above = [], []
    for kk in ks:
        h, t = value(results, hier, kk, "explained_variance"), value(results, f"topk_k{kk}", kk, "explained_variance")
        tr = value(results, trunc, kk, "explained_variance")
        hf, tf = value(results, hier, kk, "f1"), value(results, f"topk_k{kk}", kk, "f1")
        if None in (h, t, tr, hf, tf):
            continue
        gaps.append(h - t)
        if kk < k_max:
            above.append(h - tr)
        lines.append(
            f"  - k'={kk}: EV hierarchical {h:.4f} vs separate TopK {t:.4f} (Δ {h - t:+.4f}) vs TopK-{k_max} "
            f"truncated {tr:.4f} (Δ {h - tr:+.4f}); F1 {hf:.4f} vs {tf:.4f}"
        )
    if gaps:
        near = all(g >= -0.01 for g in gaps)
        far = all(a >= 0.05 for a in above)
        verdict = "holds" if near and far else ("does not hold" if not near and not far else "partly holds")
        lines.insert(
            1,
            f"- **HierarchicalTopK (one SAE, K={k_max}) on/near the separate-TopK frontier at every k' and far above "
            f"a truncated TopK: {verdict}** (rule: EV within 0.01 of the separate TopK at every k' "
            f"({'yes' if near else 'no'}), and ≥ 0.05 above TopK-{k_max} truncated at every k' < {k_max} "
            f"({'yes' if far else 'no'}); one seed). MCC is a property of the decoder alone, so it is one number "
            f"for the hierarchical SAE at every k': {value(results, hier, k_max, 'mcc'):.4f}, against the separate "
            "TopK SAEs' " + ", ".join(f"k={kk} {value(results, f'topk_k{kk}', kk, 'mcc'):.4f}" for kk in ks) + ".",
        )
    # 2. Matryoshka vs BatchTopK on hierarchical features
    pairs = [
        ("ours", f"matryoshka_k{k}", f"batchtopk_k{k}"),
        ("SAELens (our lr schedule)", f"saelens_matryoshka_k{k}", f"saelens_batchtopk_k{k}"),
        ("SAELens (its defaults)", f"saelensdefaults_matryoshka_k{k}", f"saelensdefaults_batchtopk_k{k}"),
    ]
    wins, details = [], []
    for who, mat, btk in pairs:
        got = [value(results, name, None, metric) for name in (mat, btk) for metric in ("mcc_parents", "f1_parents")]
        if None in got:
            continue
        mp, mf, bp, bf = got
        wins.append(mp > bp and mf > bf)
        details.append(
            f"  - {who}: MCC over parent features {mp:.4f} vs {bp:.4f}, F1 over parents {mf:.4f} vs {bf:.4f}; "
            f"roots only MCC {value(results, mat, None, 'mcc_roots'):.4f} vs "
            f"{value(results, btk, None, 'mcc_roots'):.4f}, F1 {value(results, mat, None, 'f1_roots'):.4f} vs "
            f"{value(results, btk, None, 'f1_roots'):.4f}; "
            f"leaves MCC {value(results, mat, None, 'mcc_leaves'):.4f} vs "
            f"{value(results, btk, None, 'mcc_leaves'):.4f}; "
            f"all features MCC {value(results, mat, None, 'mcc'):.4f} vs {value(results, btk, None, 'mcc'):.4f}"
        )
    if wins:
        verdict = (
            "holds" if all(wins) else ("does not hold" if not any(wins) else "inconclusive (the two trainers disagree)")
        )
        lines.append(
            f"- **Matryoshka recovers hierarchical (parent/child) features better than BatchTopK: {verdict}** (rule: "
            "Matryoshka above BatchTopK on both the MCC and the F1 over parent features, for our trainer and for "
            "each SAELens recipe; parents = hierarchy features with children; per feature, the latent the one-to-one "
            "matching gives it):"
        )
        lines += details
    # 3. KronSAE competitive at fewer encoder FLOPs
    kron, topk = f"kron_k{k}", f"topk_k{k}"
    got = [value(results, n, k, m) for n in (kron, topk) for m in ("explained_variance", "mcc", "f1")]
    if None not in got:
        ke, km, kf, te, tm, tf = got
        ratio = (args.d_sae // 8) * 6 / args.d_sae
        competitive = ke >= te - 0.01 and km >= tm - 0.02
        lines.append(
            f"- **KronSAE (centred encoder) competitive at fewer encoder FLOPs: "
            f"{'holds' if competitive else 'does not hold'}** (rule: EV within 0.01 and MCC within 0.02 of TopK at "
            f"the same k={k} and the same samples): KronSAE (m, n) = (2, 4) EV {ke:.4f} / MCC {km:.4f} / F1 {kf:.4f} "
            f"vs TopK EV {te:.4f} / MCC {tm:.4f} / F1 {tf:.4f}, at {ratio:.2f}x TopK's encoder multiply-adds "
            f"(h·(m+n) = {(args.d_sae // 8) * 6} vs d_sae = {args.d_sae} columns)."
        )
    return "\n".join(lines)


def cross_check_text(results: dict) -> str:
    lines = []
    for name, run in results["training"].items():
        theirs = run.get("sae_lens_metrics")
        ours = results["evaluations"].get(f"{name}@cross_check")
        if theirs and ours:
            lines.append(
                f"- {LABELS[family(name)]}: MCC {ours['mcc']:.6f} (here) vs {theirs['mcc']:.6f} (sae_lens), F1 "
                f"{ours['f1']:.6f} vs {theirs['f1']:.6f}, precision {ours['precision']:.6f} vs "
                f"{theirs['precision']:.6f}, recall {ours['recall']:.6f} vs {theirs['recall']:.6f}, L0 "
                f"{ours['l0']:.3f} vs {theirs['l0']:.3f}"
            )
    return "\n".join(lines)


def plot(args, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.pareto import save

    ks, k_max, k = args.topk_ks, max(args.topk_ks), args.k
    metrics = [("explained_variance", "explained variance"), ("mcc", "MCC"), ("f1", "F1 (feature detection)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.4))
    lines = [
        ("separate TopK SAEs", [(f"topk_k{kk}", kk) for kk in ks], "o-", "black"),
        (f"one HierarchicalTopK SAE (K={k_max}) at k'", [(f"hierarchical_k{k_max}", kk) for kk in ks], "s-", "tab:red"),
        (f"TopK k={k_max} truncated to k'", [(f"topk_k{k_max}", kk) for kk in ks], "^--", "tab:blue"),
    ]
    points = [
        (f"kron_k{k}", k, "*", "tab:orange"),
        (f"batchtopk_k{k}", None, "D", "tab:green"),
        (f"matryoshka_k{k}", None, "P", "tab:purple"),
        ("jumprelu", None, "X", "tab:brown"),
        (f"saelens_batchtopk_k{k}", None, "d", "lime"),
        (f"saelens_matryoshka_k{k}", None, "p", "violet"),
        (f"saelensdefaults_batchtopk_k{k}", None, "h", "olive"),
        (f"saelensdefaults_matryoshka_k{k}", None, "8", "pink"),
    ]
    for ax, (metric, ylabel) in zip(axes, metrics):
        for label, entries, style, color in lines:
            found = [(value(results, n, b, "l0"), value(results, n, b, metric)) for n, b in entries]
            found = [f for f in found if None not in f]
            if found:
                ax.plot(*zip(*found), style, color=color, lw=2 if color == "black" else 1.5, label=label)
        for name, budget, marker, color in points:
            l0, y = value(results, name, budget, "l0"), value(results, name, budget, metric)
            if l0 is not None:
                label = LABELS[family(name)] + (" (threshold)" if budget is None and family(name) != "jumprelu" else "")
                ax.plot(
                    [l0], [y], marker, color=color, ms=10, ls="none", label=f"{label}, k={k}" if "_k" in name else label
                )
        if metric == "mcc":
            chance = results["random_decoder_mcc"]
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"MCC of random directions {chance:.3f}")
        true_l0 = results["generator"]["true_l0_heldout"]
        ax.axvline(true_l0, color="grey", ls=":", lw=1, label=f"true L0 {true_l0:.1f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per sample)")
        ax.set_ylabel(ylabel + " (held-out)")
        ax.grid(alpha=0.3)
    legend: dict = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=9)
    g = results["generator"]
    fig.suptitle(
        f"Synthetic ground truth (SynthSAEBench-style, {g['params']['num_features']:,} features in d "
        f"{g['params']['hidden_dim']}), {int(args.samples):,} samples per SAE, d_sae {args.d_sae}, seed {args.seed}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    save(fig, path, tight=False)


def report(args, results: dict) -> None:
    from experiments.common import DOCS, markdown_table, update_results

    k_max = max(args.topk_ks)
    plot(args, results, DOCS / "synthetic.png")
    g = results["generator"]
    p = g["params"]
    table = markdown_table(["SAE", *[c for c, _ in COLUMNS], "train s"], table_rows(results, k_max))
    scale_headers, scale = scale_rows(args, results, k_max)
    scale_text = (
        "**Scale.** The same SAEs (same generator and seed; a run longer than its generated rows repeats them, see "
        "the claims below) at each sample count run so far, held-out EV, MCC and F1:\n\n"
        + markdown_table(scale_headers, scale)
        if len(scale_headers) > 4
        else ""
    )
    steps = math.ceil(int(args.samples) / args.batch_size)
    auxk_note = ", so its AuxK never engaged" if steps <= 1000 else ""
    training = results["training"]
    total_train = sum(run.get("seconds", 0.0) for run in training.values())
    text = f"""## 5. Synthetic ground truth: every architecture and SAELens's trainers on SynthSAEBench-style data

Protocol of SynthSAEBench (Chanin et al., arXiv 2602.14687), scaled down to this 2-core CPU. Generator
(`sae_lens.synthetic.SyntheticModel`, SAELens {g["sae_lens_version"]}, run in its own venv): {p["num_features"]:,}
ground-truth features in d = {p["hidden_dim"]} (16x superposition, as SynthSAEBench-16k's 16,384 in 768); Zipfian
firing probabilities (exponent {p["zipf_exponent"]}, p from {p["min_prob"]:g} to {p["max_prob"]:g}; SynthSAEBench-16k:
5e-4 to 0.4); hierarchy of {p["hierarchy_roots"]} roots, branching {p["branching_factor"]}, depth {p["max_depth"]},
all children mutually exclusive; low-rank correlation (rank {p["correlation_rank"]}, scale {p["correlation_scale"]});
mean magnitude linear {p["mean_magnitude"][0]:g} → {p["mean_magnitude"][1]:g}, std folded normal
({p["std_magnitude"][0]:g}, {p["std_magnitude"][1]:g}); no orthogonalisation step. True L0 on the held-out set:
{g["true_l0_heldout"]:.2f}. **Scale: {int(args.samples):,} training samples per SAE**{epochs_text(int(args.samples), g)}
(SynthSAEBench trains on 200M), {g["heldout"]:,} held-out samples, d_sae = {args.d_sae} (= the number of true
features), batch {args.batch_size}, seed {args.seed}. Every SAE sees exactly the same training rows (ours in one
seeded order, SAELens's in another).

Ours: `experiments/common.train_sae` (the training CLI's recipe: activation scale, b_dec at the geometric median,
AdamW at 8e-4/sqrt(d_sae/2^14), 10% warm-up then cosine to 1e-6, clipping, AuxK as each architecture's default);
JumpReLU with λ = {args.jumprelu_l0:g} (not tuned to the others' L0) and the run-length λ warm-up of the package.
SAELens's BatchTopK and Matryoshka BatchTopK (prefix widths {saelens_variants(args)[1]["widths"]}, our Matryoshka's
default groups): SAELens's `SAETrainer` on the same rows, same batch size and sample count, the same peak learning
rate, warm-up and cosine decay (its `cosineannealing` schedule), its own AuxK and decoder-norm handling, no input
normalisation; and once more with the defaults of SAELens's `SyntheticSAERunnerConfig` (lr 3e-4, constant, no
warm-up; rows "SAELens defaults"). Saved with `save_inference_model` and read back by
`hf_sae.convert.from_sae_lens`. BatchTopK-family SAEs (k={args.k}) are evaluated at their learnt inference
threshold, so their L0 is what the threshold gives.

Metrics: one implementation (`experiments/synthetic.py`, from SynthSAEBench's definitions as `sae_lens.synthetic.evals`
implements them; unit-tested in tests/test_synthetic.py) for every SAE. MCC: mean |cos| over the optimal one-to-one
(Hungarian) matching of decoder rows to true directions. F1 / precision / recall: per latent, "latent fires" as a
detector of "its best-|cos| true feature fires", averaged over all latents (dead ones count 0). EV = 1 − Σ‖x − x̂‖² /
Σ‖x − x̄‖². Dead: fraction of latents that never fire on the held-out set. "MCC / F1 roots", "parents" and
"leaves": per true feature of the hierarchy (roots: {len_group(results, "roots")} features; parents = roots and
inner nodes: {len_group(results, "parents")}; leaves: {len_group(results, "leaves")}), the |cos| and F1 of the
latent the one-to-one matching assigns it, averaged over the group. Cross-check against sae_lens's own
`mean_correlation_coefficient` / `compute_classification_metrics` on SAELens's SAEs (their inference models, first
{CROSS_CHECK_ROWS:,} held-out rows, in their venv):

{cross_check_text(results)}

Command: `python experiments/synthetic.py --seed {args.seed} --samples {args.samples}` (resumable; after the
generation, `--only ours` and `--only saelens` in two processes use both cores, then the plain command evaluates;
{g["seconds"]:.0f} s generation, {total_train:.0f} s of training steps in all on this shared CPU; data and SAEs in
`runs/synthetic/`).

![synthetic](synthetic.png)

{table}

{scale_text}

Dead latents: SAELens marks a latent dead (for its AuxK) after `dead_feature_window` = 1000 steps without firing
(its default; this run has {steps:,} steps{auxk_note}); ours counts a latent dead after a tenth of the run
(`training.saes.default_dead_tokens`).

"train s": seconds of optimiser steps (ours) or of SAELens's `fit` (theirs), data in memory; the CPU is shared
with another job, so compare within a row's order of magnitude only.

**The papers' claims beside this measurement** (seed {args.seed}, {int(args.samples):,} samples: differences of a few
0.001 are within what another seed could move; the seeds below repeat the hierarchical comparison):

{claims(args, results)}

{seeds_text(args)}

{longer_claims(args, results)}
"""
    update_results("synthetic", text)
    print(text, flush=True)


def seed_runs(samples: int) -> dict[int, dict]:
    """seed -> evaluated results of every seed's run at ``samples`` (``synthetic_seed<seed>_n<samples>.json``)."""
    runs = {}
    for path in (ROOT / "experiments" / "results").glob(f"synthetic_seed*_n{samples}.json"):
        other = json.loads(path.read_text())
        if other.get("evaluations"):
            runs[int(other["args"]["seed"])] = other
    return dict(sorted(runs.items()))


def seeds_text(args) -> str:
    """HierarchicalTopK vs the separate TopK SAEs and vs the truncated TopK at every k', paired by seed over every
    seed's run at these samples (each seed: its own generated ground truth and rows, its own initialisation)."""
    from experiments.common import markdown_table, paired_stats, pm

    runs = seed_runs(int(args.samples))
    ks, k_max = args.topk_ks, max(args.topk_ks)
    hier, trunc = f"hierarchical_k{k_max}", f"topk_k{k_max}"
    rows, verdicts = [], []
    for kk in ks:
        for metric, name in (("explained_variance", "EV"), ("mcc", "MCC"), ("f1", "F1")):
            per = {
                seed: (value(r, hier, kk, metric), value(r, f"topk_k{kk}", kk, metric), value(r, trunc, kk, metric))
                for seed, r in runs.items()
            }
            per = {seed: v for seed, v in per.items() if None not in v}
            if len(per) < 2:
                continue
            separate = paired_stats({seed: h - t for seed, (h, t, _) in per.items()})
            truncated = paired_stats({seed: h - tr for seed, (h, _, tr) in per.items()})
            rows.append(
                [
                    f"k'={kk}",
                    name,
                    ", ".join(map(str, per)),
                    pm([h for h, _, _ in per.values()]),
                    pm([t for _, t, _ in per.values()]),
                    f"{separate['mean']:+.4f} ± {separate['ci95']:.4f}",
                    "yes" if separate["significant"] else "no",
                    "–" if kk == k_max else f"{truncated['mean']:+.4f} ± {truncated['ci95']:.4f}",
                ]
            )
            if metric == "explained_variance":
                verdicts.append((kk, separate, truncated))
    if not rows:
        return ""
    table = markdown_table(
        [
            "k'",
            "metric",
            "seeds",
            f"HierarchicalTopK K={k_max}",
            "separate TopK k=k'",
            "hierarchical − separate (mean ± 95% half-width)",
            "beyond seed spread",
            f"hierarchical − TopK-{k_max} truncated",
        ],
        rows,
    )
    below = [kk for kk, sep, _ in verdicts if sep["mean"] + sep["ci95"] < -0.01]
    near = [kk for kk, sep, _ in verdicts if sep["mean"] - sep["ci95"] >= -0.01]
    far = [kk for kk, _, tr in verdicts if kk < k_max and tr["mean"] - tr["ci95"] >= 0.05]
    verdict = (
        "does not hold"
        if below
        else ("holds" if len(near) == len(verdicts) and len(far) == len(ks) - 1 else "inconclusive")
    )
    seeds = ", ".join(map(str, runs))
    kron_text = ""
    k = int(getattr(args, "k", 16))
    kron = {
        seed: [value(r, name, k, m) for name in (f"kron_k{k}", f"topk_k{k}") for m in ("explained_variance", "mcc")]
        for seed, r in runs.items()
    }
    kron = {seed: v for seed, v in kron.items() if None not in v}
    if len(kron) > 1:
        ev = paired_stats({seed: kron_ev - topk_ev for seed, (kron_ev, _, topk_ev, _) in kron.items()})
        mc = paired_stats({seed: kron_mcc - topk_mcc for seed, (_, kron_mcc, _, topk_mcc) in kron.items()})
        if ev["mean"] - ev["ci95"] >= -0.01 and mc["mean"] - mc["ci95"] >= -0.02:
            kron_verdict = "holds"
        elif ev["mean"] + ev["ci95"] < -0.01 or mc["mean"] + mc["ci95"] < -0.02:
            kron_verdict = "does not hold"
        else:
            kron_verdict = "inconclusive"
        kron_text = (
            f"\n- **KronSAE (2, 4) competitive with TopK k={k} (EV within 0.01, MCC within 0.02), over {len(kron)} "
            f"seeds: {kron_verdict}** (KronSAE − TopK, mean ± 95% "
            f"half-width: EV {ev['mean']:+.4f} ± {ev['ci95']:.4f}, MCC {mc['mean']:+.4f} ± {mc['ci95']:.4f}; per seed "
            "EV " + ", ".join(f"{v:+.4f}" for v in ev["per_seed"].values()) + ")."
        )
    return f"""**Seeds {seeds}: the hierarchical comparison** (each seed generates its own ground truth — directions,
hierarchy, firing probabilities, correlations — and its own rows with the generator above, and initialises its SAEs
from its own draw; seeds other than 0 train TopK at each k, the hierarchical SAE and KronSAE only; {int(args.samples):,}
samples each). Mean ± sample std over the seeds; differences paired by seed with the two-sided 95% half-width of
their mean ("beyond seed spread": the interval excludes zero):

{table}

- **HierarchicalTopK on/near the separate-TopK frontier (EV within 0.01 at every k') and ≥ 0.05 above the
  truncated TopK, over {len(runs)} seeds: {verdict}** (EV: whole 95% interval below −0.01 at k' ∈
  {{{", ".join(map(str, below)) or "–"}}}; within 0.01 at k' ∈ {{{", ".join(map(str, near)) or "–"}}}; ≥ 0.05 above the
  truncated TopK at k' ∈ {{{", ".join(map(str, far)) or "–"}}}).{kron_text}"""


def epochs_text(samples: int, generator: dict) -> str:
    """How the samples relate to the generated rows: fresh rows, or several epochs of another run's rows."""
    rows = int(generator["samples"])
    if samples <= rows:
        return ", each a freshly generated row"
    return (
        f" ({samples / rows:.1f} epochs of {rows:,} generated rows, reshuffled each epoch; the rows and the held-out "
        "set of the shorter run)"
    )


def len_group(results: dict, name: str) -> int:
    return int(results.get("groups", {}).get(name, 0))


if __name__ == "__main__":
    main()
