"""Train one SAE for a few steps split by latent over N CPU processes (gloo), or whole in this process.

The exactness tests and ``benchmarks/bench_latent_parallel.py`` run it: every process draws the same SAE and the same
batches from ``--seed``, trains ``--steps`` steps of :func:`hf_sae.training_step`, and process 0 writes the gathered
SAE's weights (safetensors), the selected latent ids of every step and the timings to ``--out`` (a JSON + a
``.safetensors`` beside it).

    python -m hf_sae.testing.latent_parallel_run --world 3 --out /tmp/lp3.json
    python -m hf_sae.testing.latent_parallel_run --world 1 --whole --out /tmp/whole.json   # the reference
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, training_step
from hf_sae._io import atomic_path, write_json_atomic
from hf_sae.latent_parallel import gather_optimizer_state, gather_sae, shard_optimizer_state, shard_sae


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="processes (1: the wrapper on one process)")
    p.add_argument("--whole", action="store_true", help="train the unsplit SAE (the reference), --world 1 only")
    p.add_argument("--d-in", type=int, default=24)
    p.add_argument("--d-sae", type=int, default=96)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--topk", action="store_true", help="plain TopK loss instead of HierarchicalTopK")
    p.add_argument("--dead-tokens", type=int, default=64, help="small, so AuxK has dead latents from step 2")
    p.add_argument("--resume-at", type=int, default=0, help="gather + re-shard weights and AdamW state at this step")
    p.add_argument("--chunk-elements", type=int, default=1 << 24, help="gathered decoder floats per chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p


def _batches(args) -> list[torch.Tensor]:
    """``steps`` + 1 batches (the first initialises b_dec): sparse codes of random directions, heavy-tailed
    magnitudes, a shared offset (so the centring matters) and a little noise."""
    g = torch.Generator().manual_seed(args.seed + 1)
    directions = torch.randn(4 * args.d_sae, args.d_in, generator=g)
    offset = torch.randn(args.d_in, generator=g) * 2
    out = []
    for _ in range(args.steps + 1):
        codes = (torch.rand(args.batch, 4 * args.d_sae, generator=g) < 3 / args.d_sae).float()
        codes *= torch.rand(args.batch, 4 * args.d_sae, generator=g).pow(2) * 4
        out.append(codes @ directions + offset + 0.05 * torch.randn(args.batch, args.d_in, generator=g))
    return out


def _sae(args) -> HierarchicalSAE:
    torch.manual_seed(args.seed)
    config = HierarchicalSAEConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        hierarchical=not args.topk,
        dead_tokens=args.dead_tokens,
        auxk_k=args.k * 2,
    )
    sae = HierarchicalSAE(config)
    sae.initialize_b_dec(_batches(args)[0], method="mean")
    sae.train()
    return sae


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``); returns the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, fused=True)


def run(rank: int, args, store_path: str) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=args.world)
    batches, sae = _batches(args)[1:], _sae(args)
    model = sae if args.whole else shard_sae(sae, chunk_elements=args.chunk_elements)
    del sae  # a shard keeps only its slice: what is left is this process's part
    gc.collect()
    resting_rss = _reset_peak_rss()
    optimizer = _optimizer(model.parameters())
    selected, seconds, auxk_steps = [], [], 0
    for step, x in enumerate(batches):
        if args.resume_at and step == args.resume_at and not args.whole:  # what a checkpoint + resume does
            whole, state = gather_sae(model), gather_optimizer_state(optimizer, [model])
            whole = [whole] if rank == 0 else [None]
            full_state = [state]
            if args.world > 1:
                dist.broadcast_object_list(whole, src=0)
                dist.broadcast_object_list(full_state, src=0)
            model = shard_sae(whole[0], chunk_elements=args.chunk_elements)
            optimizer = _optimizer(model.parameters())
            optimizer.load_state_dict(shard_optimizer_state(full_state[0], optimizer, [model]))
        started = time.perf_counter()
        result = training_step(model, optimizer, x, max_grad_norm=1.0)
        seconds.append(time.perf_counter() - started)
        selected.append(result.output.latents.indices.tolist())
        auxk_steps += int(float(result.output.losses.get("auxk", 0.0)) > 0)
    peak_rss = torch.tensor([_peak_rss() - resting_rss], dtype=torch.float64)  # before the gather below
    whole = model if args.whole else gather_sae(model)
    state_bytes = sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # weights, grad, 2 moments
    if args.world > 1:
        dist.all_reduce(peak_rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = Path(args.out)
        tensors = {name: t.contiguous() for name, t in whole.state_dict().items()}
        tensors["tokens_since_fired"] = whole.tokens_since_fired.contiguous()
        with atomic_path(out.with_suffix(".safetensors")) as tmp:
            save_file(tensors, str(tmp))
        report = {
            "world": args.world,
            "selected": selected,
            "auxk_steps": auxk_steps,
            "step_seconds_median": statistics.median(seconds[1:] or seconds or [0.0]),
            "step_peak_rss_mib": float(peak_rss) / 2**20,  # the steps' peak above the resting process
            "sae_state_mib_per_process": state_bytes / 2**20,
        }
        write_json_atomic(out, report)
    if args.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.whole and args.world != 1:
        raise SystemExit("--whole trains the unsplit SAE in one process: use --world 1")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if args.world == 1:
            run(0, args, store)
        else:
            torch.multiprocessing.spawn(run, args=(args, store), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
