"""The ``hf-sae`` command.

    hf-sae push RUN_DIR REPO_ID [--push-checkpoints] [--tag v1] [--revision BRANCH] [--include-code] [--private]
    hf-sae convert {gemma-scope,sae-lens,sparsify} SRC OUT [--subfolder PATH] [--revision REV] [--k K] [--dtype T]
    hf-sae export sae-lens RUN OUT [--k K] [--dtype T]
    hf-sae card RUN_DIR [--repo-id ID] [--output FILE | --write]
    hf-sae flow {trace,table,match} REPO ...   (feature flow; see hf_sae.flow.cli)
    hf-sae dashboard RUN_OR_REPO --out DIR [--model M] [--texts FILE] [--flow REPO]  (see hf_sae.dashboard_cli)
    hf-sae train [OPTIONS]                     (python -m training.train OPTIONS)
    hf-sae harvest [OPTIONS]                   (an activation cache: python -m training.harvest OPTIONS)
    hf-sae activations {push,pull} ...         (a cache on the Hub: python -m training.cache_hub ...)
    hf-sae --version


Each subcommand is one entry of :data:`SUBCOMMANDS` (name -> help, add_arguments(parser), run(args) -> exit code); a
new one (e.g. ``flow``) is added by appending an entry, and its ``--help`` examples by an entry of :data:`EXAMPLES`.
Errors a user can fix (bad paths, missing repos, an unreachable Hub, refused pushes; every
:class:`~hf_sae.errors.HfSaeError`) print one ``hf-sae: error: ...`` line and exit with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers.utils import logging as transformers_logging

from ._io import write_text_atomic
from ._version import __version__
from .cards import generate_collection_card, generate_model_card
from .convert import FORMATS, convert, to_sae_lens
from .dashboard_cli import DASHBOARD_SUBCOMMAND
from .dashboard_cli import EXAMPLES as DASHBOARD_EXAMPLES
from .errors import HfSaeError
from .flow.cli import FLOW_SUBCOMMAND
from .loading import load_sae
from .push import collection_subfolder, push_run, resolve_repo_id
from .registry import import_architectures, model_types
from .run_files import folder_metrics, read_command, sae_folders
from .sites import SITES


# ------------------------------------------------------------------------------------------------------ push
def _add_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder, or a saved SAE folder")
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="Hub repo, namespace/name or a bare name for your own (created if missing)"
    )
    parser.add_argument(
        "--push-checkpoints",
        action="store_true",
        help="also push every checkpoint (oldest first), each a new revision tagged step-N",
    )
    parser.add_argument("--tag", help="tag the final commit, e.g. v1 (refused if the tag exists)")
    parser.add_argument("--revision", help="branch to push to (created from main if missing); default main")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--include-code",
        action="store_true",
        help="upload a self-contained modeling file so that trust_remote_code=True loads the SAE "
        "without hf-sae installed",
    )
    parser.add_argument(
        "--license", help="license in the card (default: the base model's, e.g. gemma for Gemma; else apache-2.0)"
    )


def _run_push(args: argparse.Namespace) -> int:
    repo_id = resolve_repo_id(args.repo_id)  # a bare name: the token's namespace, printed in full below
    commits = push_run(
        args.run_dir,
        repo_id,
        push_checkpoints=args.push_checkpoints,
        tag=args.tag,
        revision=args.revision,
        commit_message=args.message,
        private=args.private or None,
        include_code=args.include_code,
        license=args.license,
    )
    previous = None
    for commit in commits:
        if commit.oid == previous:  # the Hub skips a commit whose files are all unchanged
            print(f"unchanged {repo_id}@{commit.oid}: {commit.commit_message} (same files as the last push)")
        else:
            print(f"pushed {repo_id}@{commit.oid}: {commit.commit_message}  {commit.commit_url}")
        previous = commit.oid
    if args.tag:
        print(f"tagged {repo_id}@{commits[-1].oid} as {args.tag}")
    return 0


# --------------------------------------------------------------------------------------------------- convert
def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=list(FORMATS), help="the source format")
    parser.add_argument("source", metavar="SRC", help="local folder or Hub repo id of the source SAE(s)")
    parser.add_argument(
        "out", metavar="OUT", help="folder to write the hf-sae SAE into (config.json, model.safetensors, README.md)"
    )
    parser.add_argument(
        "--subfolder",
        "--sae-id",
        "--hookpoint",
        dest="subfolder",
        help="the SAE inside SRC: Gemma Scope 'layer_20/width_16k/average_l0_71', Qwen-Scope 'layer12', a SAELens "
        "SAE folder, a sparsify hookpoint 'layers.12'",
    )
    parser.add_argument("--revision", help="Hub revision of SRC")
    parser.add_argument(
        "--k", type=int, help="JumpReLU: cap on latents encode returns (default d_sae: exact); qwen-scope: the TopK k"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the saved SAE")
    parser.add_argument("--base-model", help="override the base model recorded in the config")
    parser.add_argument("--hook-layer", type=int, help="override the layer recorded in the config")
    parser.add_argument("--hook-site", choices=SITES, help="override the site")


def _run_convert(args: argparse.Namespace) -> int:
    kwargs = {"revision": args.revision, "dtype": args.dtype}
    key = {"sae-lens": "subfolder", "sparsify": "hookpoint"}.get(args.format, "sae_id")
    kwargs[key] = args.subfolder
    if args.k is not None:
        if args.format == "sparsify":
            raise HfSaeError(
                "--k applies to JumpReLU SAEs (gemma-scope, sae-lens jumprelu/standard) and qwen-scope, not sparsify."
            )
        kwargs["k"] = args.k
    overrides = {"base_model": args.base_model, "hook_layer": args.hook_layer, "hook_site": args.hook_site}
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HfSaeError(f"OUT={out} is a file; pass a folder (created if missing) to write the converted SAE into.")
    sae = convert(args.format, args.source, **kwargs, **{k: v for k, v in overrides.items() if v is not None})
    sae.save_pretrained(out)
    write_text_atomic(out / "README.md", generate_model_card(sae).content)
    c = sae.config
    print(
        f"converted {args.format} {args.source}{'/' + args.subfolder if args.subfolder else ''} -> {out} "
        f"({type(sae).__name__}: d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, layer={c.hook_layer}, site={c.hook_site})"
    )
    return 0


# ---------------------------------------------------------------------------------------------------- export
def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["sae-lens"], help="the target format")
    parser.add_argument("run_dir", metavar="RUN", help="a training run folder, a saved SAE folder or a Hub repo id")
    parser.add_argument(
        "out", metavar="OUT", help="folder to write into (a run with several SAEs: one subfolder layer_L/site each)"
    )
    parser.add_argument("--k", type=int, help="TopK budget of the export (HierarchicalTopK: any k' <= k; default k)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the written weights")


def _run_export(args: argparse.Namespace) -> int:
    source = Path(args.run_dir)
    folders = sae_folders(source, model_types()) if source.is_dir() else []
    if source.is_dir() and not folders:
        raise HfSaeError(f"{source}: no hf-sae SAE (config.json + model.safetensors) found there.")
    if len(folders) > 1:  # a run with several SAEs: one subfolder each, named as in a pushed collection
        saes = {}
        for folder in folders:
            sae = load_sae(folder)
            saes[collection_subfolder(sae.config) if sae.config.hook_layer is not None else folder.name] = sae
    else:
        saes = {"": load_sae(folders[0] if folders else args.run_dir)}
    for name, sae in saes.items():
        target = to_sae_lens(sae, Path(args.out) / name if name else args.out, k=args.k, dtype=args.dtype)
        print(f"exported {type(sae).__name__} ({source}{'/' + name if name else ''}) -> {target} (SAELens folder)")
    return 0


# ------------------------------------------------------------------------------------------------------ card
def _add_card(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder, or a saved SAE folder")
    parser.add_argument("--repo-id", help="the repo the SAE will live in (for the usage snippet)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", help="write the card to this file instead of printing it")
    where.add_argument("--write", action="store_true", help="write README.md next to the SAE (in the run folder)")


def _run_card(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    folders = sae_folders(run_dir, model_types())
    if not folders:
        raise HfSaeError(f"{run_dir}: no hf-sae SAE (config.json + model.safetensors) found there.")
    command = read_command(run_dir)
    if len(folders) == 1:
        folder = folders[0]
        card = generate_model_card(
            load_sae(folder), folder_metrics(folder, run_dir), folder, command, repo_id=args.repo_id
        )
        target = folder / "README.md"
    else:
        saes, metrics = {}, {}
        for folder in folders:
            sae = load_sae(folder)
            name = collection_subfolder(sae.config) if sae.config.hook_layer is not None else folder.name
            saes[name], metrics[name] = sae, folder_metrics(folder, run_dir)
        card = generate_collection_card(saes, metrics, repo_id=args.repo_id)
        target = run_dir / "README.md"
    if args.write or args.output:
        target = Path(args.output) if args.output else target
        write_text_atomic(target, card.content)
        print(f"wrote {target}")
    else:
        sys.stdout.write(card.content)
    return 0


# ------------------------------------------------------------------------------ train, harvest, activations
FORWARDED = {"train": "train", "harvest": "harvest", "activations": "cache_hub"}
"""Subcommands whose arguments all go, unparsed, to a module of the training package (``hf-sae train ARGS`` is
``python -m training.train ARGS``): hf_sae never imports training, so they run in a subprocess of their own."""
HARVEST_HELP = "run the LM once over a data set and write an activation cache (python -m training.harvest)"
TRAIN_HELP = "train SAEs: the embedded default with no options (python -m training.train)"
ACTIVATIONS_HELP = "push an activation cache to the Hub as a dataset, or pull one (python -m training.cache_hub)"


def training_module(name: str) -> str:
    """The module ``python -m`` runs for ``training/<name>.py``: ``hf_sae.training.<name>`` where hf-sae is installed
    as a wheel (which ships the training folder inside the hf_sae package, installing no top-level ``training``),
    ``training.<name>`` in a checkout of the repository."""
    for package in ("hf_sae.training", "training"):
        try:
            if importlib.util.find_spec(package) is not None:
                return f"{package}.{name}"
        except ImportError:
            continue
    raise HfSaeError(
        "the training package of hf-sae is not installed (neither hf_sae.training nor training imports); reinstall "
        "hf-sae (pip install .) or run from a checkout of its repository."
    )


def _add_forwarded(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="OPTIONS",
        help="the options of the training package's program (--help lists them)",
    )


def _run_forwarded(args: argparse.Namespace) -> int:
    """``python -m <training>.<module> ARGS`` in a subprocess; its exit status is ours. ``--help`` prints its help
    and this command's examples."""
    module = training_module(FORWARDED[args.command])
    command = [sys.executable, "-m", module, *args.args]
    if any(arg in ("-h", "--help") for arg in args.args):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        text = done.stdout.replace(f"python -m {module}", f"hf-sae {args.command}", 1)
        sys.stdout.write(text.replace(f"python -m training.{FORWARDED[args.command]}", f"hf-sae {args.command}", 1))
        sys.stderr.write(done.stderr)
        print("\n" + (_epilog(args.command) or ""))
        raise SystemExit(done.returncode)
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:  # the program got the Ctrl-C too and saved what it finished
        return 130


# ------------------------------------------------------------------------------------------------------ main
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "push": ("push a training run (or a saved SAE) to the Hub with a generated card", _add_push, _run_push),
    "convert": ("convert a Gemma Scope / SAELens / sparsify SAE into an hf-sae SAE folder", _add_convert, _run_convert),
    "export": ("write a run's SAE(s) in another library's format (SAELens)", _add_export, _run_export),
    "card": ("print (or write) the model card of a run's SAE", _add_card, _run_card),
    "flow": FLOW_SUBCOMMAND,
    "dashboard": DASHBOARD_SUBCOMMAND,
    "train": (TRAIN_HELP, _add_forwarded, _run_forwarded),
    "harvest": (HARVEST_HELP, _add_forwarded, _run_forwarded),
    "activations": (ACTIVATIONS_HELP, _add_forwarded, _run_forwarded),
}


EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "push": [
        (
            "push a finished run (a single SAE, or a collection for a multi-SAE run)",
            "hf-sae push runs/my-run me/my-sae",
        ),
        (
            "every checkpoint as a revision tagged step-N, then the final SAE tagged v1",
            "hf-sae push runs/my-run me/my-sae --push-checkpoints --tag v1",
        ),
        (
            "to your own namespace (bare name), loadable without hf-sae",
            "hf-sae push runs/my-run my-sae --include-code --private",
        ),
    ],
    "convert": [
        (
            "a Gemma Scope SAE from the Hub",
            "hf-sae convert gemma-scope google/gemma-scope-2b-pt-res out/l20 --sae-id layer_20/width_16k/average_l0_71",
        ),
        ("a SAELens SAE folder", "hf-sae convert sae-lens path/to/blocks.12.hook_resid_post out/l12"),
        (
            "one hookpoint of a sparsify run",
            "hf-sae convert sparsify EleutherAI/sae-llama-3-8b-32x out/l10 --hookpoint layers.10",
        ),
    ],
    "export": [
        ("a run's SAE as a SAELens folder (sae_lens.SAE.load_from_disk)", "hf-sae export sae-lens runs/my-run out/sl"),
        (
            "a HierarchicalTopK SAE as the TopK SAE of its first 16 latents",
            "hf-sae export sae-lens runs/h out/k16 --k 16",
        ),
    ],
    "card": [
        ("print the card of a run's SAE", "hf-sae card runs/my-run"),
        (
            "write README.md next to the SAE, with the repo it will live in",
            "hf-sae card runs/my-run --repo-id me/my-sae --write",
        ),
    ],
    "flow": [
        (
            "trace feature 1234 of layer 12 into a picture",
            "hf-sae flow trace me/gemma-2-2b-saes --layer 12 --feature 1234 --out flow.png",
        ),
        ("per-layer class table as CSV", "hf-sae flow table me/gemma-2-2b-saes --out table.csv"),
        (
            "match layer 12's features into layer 11",
            "hf-sae flow match me/gemma-2-2b-saes --source 12/resid --target 11/resid",
        ),
    ],
    "dashboard": DASHBOARD_EXAMPLES,
    "train": [
        ("the embedded default (Gemma 3 270M, English text; CPU, minutes)", "hf-sae train --out runs/default"),
        (
            "layer 12 of Gemma 2 2B",
            "hf-sae train --model google/gemma-2-2b --layer 12 --d-sae 65536 --k 64 --out runs/l12",
        ),
        ("from an activation cache", "hf-sae train --activations acts/g2b --epochs 4"),
    ],
    "activations": [
        ("push a cache as a Hub dataset (with a generated card)", "hf-sae activations push acts/g2b me/g2b-acts"),
        ("pull it back (every shard checked)", "hf-sae activations pull me/g2b-acts acts/g2b"),
    ],
    "harvest": [
        (
            "cache 10M activations of layers 6 and 12 (bfloat16), then train from the cache",
            "hf-sae harvest --model google/gemma-2-2b --layer 6 12 --site resid --tokens 10M --out acts/g2b",
        ),
        ("continue a harvest that was killed (ends byte-identical)", "hf-sae harvest --resume acts/g2b"),
        ("the embedded default (Gemma 3 270M, English text) into a folder", "hf-sae harvest --out acts/default"),
    ],
}


def _epilog(name: str) -> str | None:
    examples = EXAMPLES.get(name)
    if not examples:
        return None
    return "examples:\n" + "\n".join(f"  # {what}\n  {command}\n" for what, command in examples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-sae",
        description="Sparse autoencoders as Hugging Face models.",
        epilog="examples:\n"
        + "\n".join(f"  {examples[0][1]}" for examples in EXAMPLES.values())
        + "\n\n`hf-sae COMMAND --help` shows each command's options and more examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-sae {__version__}")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="import a Python file or module first, e.g. one that registers an architecture of your own",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        child = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=name not in FORWARDED,  # its --help is the other program's
        )
        add_arguments(child)
        child.set_defaults(run=run)
    return parser


def error_line(err: BaseException) -> str:
    """``hf-sae: error: <message>`` on one line (a server's multi-line answer is folded into it)."""
    return "hf-sae: error: " + re.sub(r"\s*\n\s*", " ", str(err).strip())


def _split_forwarded(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(hf-sae's own arguments up to a forwarded subcommand, the arguments it forwards), or (argv, None)."""
    takes_value = {"--import"}
    skip = False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token in takes_value:
            skip = True
        elif not token.startswith("-"):
            return (argv[: i + 1], argv[i + 1 :]) if token in FORWARDED else (argv, None)
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    own, forwarded = _split_forwarded(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if forwarded is not None:
        args.args = forwarded
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" of a few tensors
    try:
        for target in args.imports:
            import_architectures(target)
        return args.run(args)
    except HfSaeError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
