"""TopK SAE training-step throughput: hf-sae vs EleutherAI sparsify vs SAELens, interleaved in one run.

Why interleaved: on a shared machine the load drifts by 2x within minutes, so libraries measured one after the
other compare the load as much as the code. Here every library keeps one long-lived worker process (hf-sae in this
interpreter's environment, each peer in its own virtual environment), builds its SAE once, and the parent asks the
workers in turn to time a few steps, round after round. The headline number is, for each peer, the median over
rounds of the per-round ratio hf-sae tokens/s / peer tokens/s: the two numbers of a ratio are measured seconds
apart, so the drift cancels in it.

    python benchmarks/bench_peers.py --setup     # once: the peers' venvs (CPU torch 2.13.0 first, then the peer)
    python benchmarks/bench_peers.py --quick     # small shape, 3 rounds (4 min on the shared 2-core machine)
    python benchmarks/bench_peers.py             # both shapes, 5 rounds (16 min there)

Shapes: small = d_in 640, d_sae 4096, k 32, batch 4096 (Gemma 3 270M); large = d_in 2304, d_sae 16384, k 64,
batch 2048 (Gemma 2 2B). Every worker draws the same random activations (``torch.manual_seed(0)``, the same torch
2.13.0 everywhere, 4 batches used in turn) and runs with the parent's torch thread count. fp32 and bf16 are
separate phases (four workers alive at a time, so the large shape's six SAEs never sit in memory together).

What one timed step is, for each library (its own trainer's step, read from its installed source; the data loader,
logging and checkpointing of each trainer are left out of all three):

- **hf-sae** (TopK): ``hf_sae.training_step(sae, optimizer, x, scheduler=..., max_grad_norm=1.0)`` exactly as
  ``training/train.py`` calls it, with the recipe's optimiser (``training.saes.adamw_with_schedule``: torch AdamW,
  warm-up + cosine schedule, the architecture's default learning rate). The step is: forward with the TopK loss and
  AuxK on dead latents (config default ``auxk=True``), the dead-latent counters, backward, removal of the decoder
  gradient parallel to the decoder rows, gradient-norm clipping, AdamW, scheduler, decoder rows renormalised.
  Its worker keeps freed memory for reuse (``hf_sae.hardware.retain_freed_memory``) and puts large tensors on
  transparent huge pages (``hf_sae.hardware.use_huge_pages``), as ``training/train.py`` does on CPU; the peers'
  workers run with glibc's and torch's defaults, as their trainers do.
  bf16: the same call with ``autocast_dtype=torch.bfloat16`` (and any config fields given by ``--ours-bf16-config``,
  for a native bf16 encoder path).
- **sparsify** (``eai-sparsify`` 1.3.3, ``Trainer.fit``): decoder rows renormalised, dead mask from the
  tokens-since-fired counters, ``SparseCoder.forward(x, y=x, dead_mask=..., total_variance=...)`` (its fused encoder,
  embedding-bag decoder, FVU and AuxK), the did-fire mask, ``float(fvu)`` (its per-step metric), backward of
  ``fvu + auxk_alpha * auxk_loss``, ``remove_gradient_parallel_to_decoder_directions``, its default optimiser
  (``optimizer="signum"``: schedule-free SignSGD, momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14)), ``zero_grad``, the
  counters updated. ``auxk_alpha`` is 1/32 here (sparsify's default is 0, i.e. no AuxK; hf-sae's is on).
  bf16: ``torch.autocast("cpu", bfloat16)`` around the forward, as sparsify's own ``forward`` does on CUDA.
- **SAELens** (``sae-lens`` 6.54, ``SAETrainer._train_step``): ``TopKTrainingSAE.training_forward_pass`` (its
  defaults: dense TopK activations, ``rescale_acts_by_decoder_norm=True``, MSE + TopK AuxK loss with the dead mask
  from ``n_forward_passes_since_fired > dead_feature_window``), the firing statistics, backward,
  ``clip_grad_norm_(1.0)``, torch Adam (lr 3e-4, betas 0.9 / 0.999), ``zero_grad``, its constant lr scheduler.
  bf16: its ``autocast=True`` option, i.e. ``torch.autocast(device_type, bfloat16)`` around the forward pass and
  the statistics.

- **floor** (not a library): one encoder ``torch.addmm`` of the batch plus ``torch.topk`` of its rows, the part of a
  TopK step every implementation has in some form (as in ``bench_sae_step.py``), timed in the same rounds. floor
  tokens/s / peer tokens/s is the ratio a step costing only that would reach against the peer: a reference for how
  much of a ratio target the encoder alone leaves, not a bound (hf-sae's matmul adds no bias broadcast and its
  top-k kernel is faster than ``torch.topk``, so its step can come out below the floor). bf16: both operands bf16.

With a fresh SAE and a handful of steps no latent is dead in any library, so AuxK costs each of them only its
dead-mask check; a dead-latent workload is ``bench_sae_step.py``'s business.

Per request a worker times ``--steps`` steps and the parent keeps batch / (median step seconds) as that round's
tokens/s. Memory, per worker (its ``ru_maxrss``): ``peak MB`` is the peak minus the RSS after imports and data,
before the SAE was built (weights, optimiser state and the step's transient memory); ``step MB`` is the peak minus
the RSS right before the first timed step (the step's transient memory beyond what stays allocated).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch  # in every interpreter this file runs in: ours and the peers' venvs

OURS = "hf_sae"
FLOOR = "floor"
"""Not a library: the encoder addmm + topk alone, in our interpreter (a reference for the ratios to the peers)."""
PEERS = {"sparsify": "eai-sparsify==1.3.3", "saelens": "sae-lens==6.54.12"}
"""Each peer's worker runs in ``--venv-dir``/<name>, with this requirement installed after CPU torch."""
TORCH_REQUIREMENT = "torch==2.13.0"
TARGETS = {"sparsify": 3.0, "saelens": 5.0}
"""Issue 12, item 5: hf-sae tokens/s / peer tokens/s at the small shape, fp32 (median over rounds)."""
LABELS = {OURS: "hf-sae", FLOOR: "floor (addmm + topk)", "sparsify": "EleutherAI sparsify", "saelens": "SAELens"}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: the SAE (d_in, d_sae, k) and the tokens per step (batch)."""

    name: str
    d_in: int
    d_sae: int
    k: int
    batch: int
    model: str

    def describe(self) -> str:
        return f"{self.name} = {self.model}: d_in {self.d_in}, d_sae {self.d_sae}, k {self.k}, batch {self.batch}"


SHAPES = {
    "small": Shape("small", 640, 4096, 32, 4096, "Gemma 3 270M"),
    "large": Shape("large", 2304, 16384, 64, 2048, "Gemma 2 2B"),
}
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Worker side: runs in ours or a peer's interpreter; imports only its own library.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_hf_sae_step(shape: Shape, bf16: bool, bf16_config: dict) -> Callable[[torch.Tensor], None]:
    """hf-sae's step as ``training/train.py`` runs it (see the module docstring)."""
    from hf_sae import training_step
    from hf_sae.registry import resolve_architecture
    from training.saes import adamw_with_schedule

    architecture, preset = resolve_architecture("topk")
    fields = bf16_config if bf16 else {}
    config = architecture.build_config(preset, d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k, **fields)
    sae = architecture.model_class(config)
    sae.train()
    lr = type(sae).default_learning_rate(sae.config)
    optimizer, scheduler = adamw_with_schedule([{"params": sae.parameters(), "lr": lr}], total_steps=100_000)
    autocast_dtype = torch.bfloat16 if bf16 else None

    def step(x: torch.Tensor) -> None:
        training_step(sae, optimizer, x, scheduler=scheduler, max_grad_norm=1.0, autocast_dtype=autocast_dtype)

    return step


def build_floor_step(shape: Shape, bf16: bool) -> Callable[[torch.Tensor], None]:
    """One encoder ``addmm`` + ``topk`` of the batch: what every TopK step contains (see the module docstring)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    weight = torch.randn(shape.d_sae, shape.d_in).to(dtype)
    bias = torch.zeros(shape.d_sae, dtype=dtype)

    def step(x: torch.Tensor) -> None:
        torch.addmm(bias, x.to(dtype), weight.t()).topk(shape.k, dim=-1)

    return step


def build_sparsify_step(shape: Shape, bf16: bool, first_batch: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """sparsify's ``Trainer.fit`` step for one SAE, one micro-batch (see the module docstring)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(shape.d_in, SparseCoderConfig(num_latents=shape.d_sae, k=shape.k), dtype=torch.float32)
    sae.b_dec.data = first_batch.mean(0)  # the trainer's first-step init
    lr = 5e-3 / (shape.d_sae / 2**14) ** 0.5
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    auxk_alpha, dead_feature_threshold = 1.0 / 32.0, 10_000_000
    num_tokens_since_fired = torch.zeros(shape.d_sae, dtype=torch.long)
    did_fire = torch.zeros(shape.d_sae, dtype=torch.bool)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = num_tokens_since_fired > dead_feature_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast:
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            num_tokens_since_fired.add_(x.shape[0])
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    return step


def build_saelens_step(shape: Shape, bf16: bool) -> Callable[[torch.Tensor], None]:
    """SAELens' ``SAETrainer._train_step`` for a ``TopKTrainingSAE`` (see the module docstring)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.optim import get_lr_scheduler

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k))
    lr = 3e-4
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    scheduler = get_lr_scheduler(
        "constant",
        optimizer=optimizer,
        training_steps=100_000,
        lr=lr,
        warm_up_steps=0,
        decay_steps=0,
        lr_end=lr / 10,
        num_cycles=1,
    )
    dead_feature_window = 1000
    n_forward_passes_since_fired = torch.zeros(shape.d_sae)
    act_freq_scores = torch.zeros(shape.d_sae)
    coefficients = {name: float(value) for name, value in sae.get_coefficients().items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    n_training_steps = 0

    def step(x: torch.Tensor) -> None:
        nonlocal n_training_steps
        sae.train()
        with autocast:
            dead = (n_forward_passes_since_fired > dead_feature_window).bool()
            out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, n_training_steps, False))
            with torch.no_grad():
                firing_feats = out.feature_acts.bool().float()
                did_fire = firing_feats.sum(-2).bool()
                n_forward_passes_since_fired.add_(1)
                n_forward_passes_since_fired[did_fire] = 0
                act_freq_scores.add_(firing_feats.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        n_training_steps += 1

    return step


def import_library(lib: str) -> None:
    """Import what ``lib``'s builder imports (the builders' own imports are then no-ops)."""
    modules = {
        OURS: ["hf_sae", "hf_sae.registry", "training.saes"],
        "sparsify": ["schedulefree", "sparsify", "sparsify.sign_sgd"],
        "saelens": ["sae_lens.saes.sae", "sae_lens.saes.topk_sae", "sae_lens.training.optim"],
    }
    for module in modules.get(lib, []):
        importlib.import_module(module)


def serve(spec: dict) -> None:
    """A worker: build one library's SAE and step, then answer ``{"steps": n}`` lines on stdin with step times.

    stdout is kept for the protocol (one JSON line per answer); anything the libraries print goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        torch.set_num_threads(spec["threads"])
        shape, lib, bf16 = Shape(**spec["shape"]), spec["lib"], spec["precision"] == "bf16"
        if lib == OURS:  # what training/train.py does on CPU, before any large tensor (the peers' keep the defaults)
            from hf_sae.hardware import retain_freed_memory, use_huge_pages

            use_huge_pages()
            retain_freed_memory()
        torch.manual_seed(0)
        data = torch.randn(4, shape.batch, shape.d_in)
        import_library(lib)  # so the memory figures leave out the imports
        rss_before_build = _rss_bytes()
        torch.manual_seed(1)
        if lib == OURS:
            step = build_hf_sae_step(shape, bf16, spec["ours_bf16_config"])
        elif lib == FLOOR:
            step = build_floor_step(shape, bf16)
        elif lib == "sparsify":
            step = build_sparsify_step(shape, bf16, data[0])
        elif lib == "saelens":
            step = build_saelens_step(shape, bf16)
        else:
            raise ValueError(f"unknown library {lib!r}; expected one of {[OURS, *PEERS]}")
        for i in range(spec["warmup"]):
            step(data[i % len(data)])
        rss_ready = _rss_bytes()
    except Exception:  # reported to the parent, which shows it in the table and stops this worker
        answer({"error": traceback.format_exc().strip().splitlines()[-1][:300]})
        return
    answer({"ready": True, "torch": torch.__version__})
    done = 0
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        times = []
        for _ in range(request["steps"]):
            start = time.perf_counter()
            step(data[done % len(data)])
            times.append(time.perf_counter() - start)
            done += 1
        peak = _peak_bytes()
        answer({"times": times, "peak_bytes": peak - rss_before_build, "step_bytes": peak - rss_ready})


# ----------------------------------------------------------------------------------------------------------------
# Parent side: start the workers, interleave the requests, summarise.


def python_for(lib: str, venv_dir: Path) -> Path | None:
    """The interpreter a library's worker runs in: this one for hf-sae, the peer's venv otherwise (None: missing)."""
    if lib in (OURS, FLOOR):
        return Path(sys.executable)
    exe = venv_dir / lib / "bin" / "python"
    return exe if exe.exists() else None


class Worker:
    """One library's long-lived worker process, spoken to in JSON lines."""

    def __init__(self, lib: str, exe: Path, spec: dict) -> None:
        self.lib = lib
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        if lib == OURS:  # ``training`` (the recipe's optimiser) is imported from the checkout
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        else:  # a peer's venv must see neither this checkout nor this environment's packages
            env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [str(exe), str(Path(__file__).resolve()), "--worker", json.dumps({"lib": lib, **spec})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            env=env,
        )

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1][:300]
            return {"error": f"worker exited with {self.process.returncode}: {tail}"}
        return json.loads(line)

    def request(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"steps": steps}) + "\n")
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"stop": True}) + "\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


def round_order(libs: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``libs`` rotated by one per round, so no library always runs first or
    always right after the same other one."""
    shift = round_index % len(libs)
    return libs[shift:] + libs[:shift]


def summarise(rounds: list[dict[str, float]], ours: str = OURS) -> dict[str, dict]:
    """Per library: the median tokens/s over rounds and, for each other library, the per-round ratio ours / it.

    ``rounds``: one dict per round, library -> tokens/s in that round (a library absent from a round is skipped in
    that round's ratio). Returns library -> {"tokens_per_s", "ratio", "ratio_min", "ratio_max"}; the ratio entries
    are None for ``ours`` and for a library never measured in the same round as ``ours``."""
    libs = sorted({lib for r in rounds for lib in r}, key=lambda lib: (lib != ours, lib))
    summary = {}
    for lib in libs:
        values = [r[lib] for r in rounds if lib in r]
        ratios = [r[ours] / r[lib] for r in rounds if lib in r and ours in r] if lib != ours else []
        summary[lib] = {
            "tokens_per_s": statistics.median(values),
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
        }
    return summary


def measure_phase(
    shape: Shape, precision: str, libs: list[str], args: argparse.Namespace, threads: int
) -> tuple[list[dict[str, float]], dict[str, dict], dict[str, str]]:
    """Start one worker per library, run ``args.rounds`` interleaved rounds; returns the per-round tokens/s, the
    last memory report per library, and the libraries that could not be measured (with why)."""
    failed: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    steps = args.steps if shape.name == "small" else max(1, args.steps // 2)
    spec = {
        "shape": vars(shape),
        "precision": precision,
        "threads": threads,
        "warmup": args.warmup,
        "ours_bf16_config": args.ours_bf16_config,
    }
    try:
        for lib in libs:
            exe = python_for(lib, args.venv_dir)
            if exe is None:
                failed[lib] = f"not installed (run --setup; no venv at {args.venv_dir / lib})"
            else:
                workers[lib] = Worker(lib, exe, spec)
        for lib, worker in list(workers.items()):  # built concurrently; building is not timed
            message = worker.receive()
            if "error" in message:
                failed[lib] = "failed: " + message["error"]
                worker.close()
                del workers[lib]
        rounds: list[dict[str, float]] = []
        memory: dict[str, dict] = {}
        for index in range(args.rounds):
            tokens_per_s = {}
            for lib in round_order([lib for lib in libs if lib in workers], index):
                message = workers[lib].request(steps)
                if "error" in message:
                    failed[lib] = "failed: " + message["error"]
                    workers.pop(lib).close()
                    continue
                tokens_per_s[lib] = shape.batch / statistics.median(message["times"])
                memory[lib] = message
            rounds.append(tokens_per_s)
            line = ", ".join(f"{LABELS[lib]} {value:,.0f}" for lib, value in tokens_per_s.items())
            print(f"  {shape.name} {precision} round {index + 1}/{args.rounds}: tokens/s {line}", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return rounds, memory, failed


def format_rows(shape: Shape, precision: str, summary: dict, memory: dict, failed: dict, libs: list[str]) -> list:
    """Markdown table rows of one phase, libraries in ``libs`` order."""
    rows = []
    for lib in libs:
        if lib in failed and lib not in summary:
            rows.append(f"| {LABELS[lib]} | {precision} | {shape.name} | {failed[lib]} | | | |")
            continue
        s, m = summary[lib], memory[lib]
        if lib == OURS:
            ratio = "1 (reference)"
        elif lib == FLOOR:
            ratio = f"{s['ratio']:.2f}x (hf-sae's step against the floor's)" if s["ratio"] is not None else "n/a"
        elif s["ratio"] is None:
            ratio = "n/a (hf-sae not measured)"
        else:
            ratio = f"{s['ratio']:.2f}x ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
        rows.append(
            f"| {LABELS[lib]} | {precision} | {shape.name} | {s['tokens_per_s']:,.0f} | {ratio} | "
            f"{m['peak_bytes'] / 2**20:,.0f} | {m['step_bytes'] / 2**20:,.0f} |"
        )
    return rows


def setup(venv_dir: Path) -> None:
    """Create each peer's venv: CPU torch first (so the peer's torch requirement is already met and pip never pulls
    the CUDA wheels), then the peer."""
    for lib, requirement in PEERS.items():
        target = venv_dir / lib
        if (target / "bin" / "python").exists():
            print(f"{lib}: {target} exists")
            continue
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH_REQUIREMENT], check=True)
        subprocess.run([*pip, requirement], check=True)
        print(f"{lib}: installed {TORCH_REQUIREMENT} and {requirement} into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help="create the peers' virtual environments and exit")
    parser.add_argument("--venv-dir", type=Path, default=Path.home() / ".cache" / "hf_sae" / "peer-venvs")
    parser.add_argument("--quick", action="store_true", help="small shape only, 3 rounds")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: both (small with --quick)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, 3 with --quick)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per request (half at the large shape)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after building each SAE")
    parser.add_argument(
        "--ours-bf16-config",
        type=json.loads,
        default={},
        help="JSON of extra hf-sae config fields for the bf16 rows (a native bf16 path), e.g. '{\"field\": value}'",
    )
    args = parser.parse_args()
    if args.worker:
        serve(json.loads(args.worker))
        return
    if args.setup:
        setup(args.venv_dir)
        return
    args.rounds = args.rounds or (3 if args.quick else 5)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not isinstance(args.ours_bf16_config, dict):
        parser.error(f"--ours-bf16-config must be a JSON object, got {args.ours_bf16_config!r}")
    shapes = [SHAPES[name] for name in (args.shapes or (["small"] if args.quick else ["small", "large"]))]

    libs = [OURS, FLOOR, *PEERS]
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads per worker; {args.rounds} interleaved rounds of {args.steps} "
        f"timed steps (large shape: {max(1, args.steps // 2)}) after {args.warmup} warm-up; tokens/s = batch / "
        "median step time of the round",
        flush=True,
    )
    rows, verdicts = [], []
    for shape in shapes:
        for precision in args.precisions:
            rounds, memory, failed = measure_phase(shape, precision, libs, args, threads)
            summary = summarise([r for r in rounds if r]) if any(rounds) else {}
            rows += format_rows(shape, precision, summary, memory, failed, libs)
            if shape.name == "small" and precision == "fp32":
                ceilings = summarise([r for r in rounds if FLOOR in r], ours=FLOOR) if any(rounds) else {}
                for lib, target in TARGETS.items():
                    ratio = summary.get(lib, {}).get("ratio")
                    verdict = "not measured" if ratio is None else ("met" if ratio >= target else "NOT met")
                    got = "" if ratio is None else f" {ratio:.2f}x:"
                    ceiling = ceilings.get(lib, {}).get("ratio")
                    at_floor = "" if ceiling is None else f" (a step costing only the floor: {ceiling:.2f}x)"
                    verdicts.append(f"- hf-sae >= {target:g}x {LABELS[lib]} (small, fp32):{got} {verdict}{at_floor}")
    described = "; ".join(shape.describe() for shape in shapes)
    print(f"\n### TopK SAE training step, interleaved ({described})\n")
    print("| library | precision | shape | median tokens/s | hf-sae / this: median (min-max) | peak MB | step MB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if verdicts:
        print("\nTargets (issue 12, item 5; median over rounds of the per-round ratio):")
        print("\n".join(verdicts))


if __name__ == "__main__":
    main()
