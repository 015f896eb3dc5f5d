"""``hf-sae flow``: feature flow from the shell.

    hf-sae flow trace REPO --layer 12 --feature 1234 --out flow.png [--out flow.html --out flow.json ...]
    hf-sae flow table REPO [--layer 12 ...] [--out table.csv] [--plot summary.png]
    hf-sae flow match REPO --source 12/resid --target 11/resid [--k 3] [--one-to-one] [--out match.csv]

REPO is a local collection folder or a Hub repo with one subfolder per SAE (``layer_{L}/{site}``). The output format
of ``trace --out`` follows the extension: .png/.svg/.pdf (layered picture), .html (interactive), .json (node-link),
.graphml. Wired into the ``hf-sae`` command by ``add_flow_subcommand(subparsers)`` (an argparse sub-parsers object)
or, for a table of subcommands, by ``FLOW_SUBCOMMAND = (help, add_flow_arguments, run_flow_command)``.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from .._io import write_text_atomic
from ..errors import FlowError
from .feature_flow import FeatureFlow
from .graph import to_graphml, to_json
from .plotting import graph_to_html, plot_graph

HELP = "feature flow across layers: trace a feature, per-layer class tables, matches (data-free)"
GRAPH_FORMATS = (".png", ".svg", ".pdf", ".html", ".json", ".graphml")


def _add_collection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", metavar="REPO", help="collection folder or Hub repo (subfolders layer_{L}/{site})")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--t-resid", type=float, default=0.5, help="t_R: resid-to-resid threshold (default 0.5)")
    parser.add_argument("--t-mlp", type=float, default=0.15, help="t_M (default 0.15)")
    parser.add_argument("--t-attn", type=float, default=0.15, help="t_A (default 0.15)")
    parser.add_argument("--t-module", type=float, default=0.15, help="module attachment threshold (default 0.15)")
    parser.add_argument("--block-size", type=int, default=4096, help="rows per matching block (default 4096)")
    parser.add_argument("--device", help="device for matching, e.g. cuda (default: where the weights load)")
    parser.add_argument("--cache-dir", help="match cache folder (default $HF_SAE_CACHE/flow); 'none' disables it")


def add_flow_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``trace`` / ``table`` / ``match`` sub-subcommands to the ``flow`` parser."""
    sub = parser.add_subparsers(dest="flow_command", required=True, metavar="{trace,table,match}")
    trace = sub.add_parser(
        "trace",
        help="flow graph of one resid feature (picture, HTML, JSON, GraphML)",
        description="Trace a resid feature backward and forward through the layers.",
    )
    _add_collection(trace)
    trace.add_argument("--layer", type=int, required=True, help="layer of the resid SAE of the feature")
    trace.add_argument("--feature", type=int, required=True, help="feature (latent) id")
    trace.add_argument("--direction", choices=("both", "backward", "forward"), default="both")
    trace.add_argument("--max-steps", type=int, help="at most this many layers in each direction")
    trace.add_argument(
        "--out",
        action="append",
        required=True,
        help=f"output file, format by extension {list(GRAPH_FORMATS)}; repeat for several",
    )
    table = sub.add_parser(
        "table",
        help="predecessor classes per layer (counts; CSV of every feature)",
        description="Per-layer predecessor classes (translated / processed / newborn / "
        "unexplained) of every resid feature.",
    )
    _add_collection(table)
    table.add_argument("--layer", type=int, action="append", help="layer(s) to tabulate (default: every resid layer)")
    table.add_argument("--out", help="CSV of every feature of the chosen layer(s)")
    table.add_argument("--plot", help="stacked-bar picture of the class shares per layer (PNG)")
    match = sub.add_parser(
        "match",
        help="top-k matches of every feature of one SAE into another",
        description="Data-free top-k (or one-to-one) matches between two SAEs of a collection.",
    )
    _add_collection(match)
    match.add_argument("--source", required=True, help="(layer/site) of the matched SAE, e.g. 12/resid")
    match.add_argument("--target", required=True, help="(layer/site) matched into, e.g. 11/resid")
    match.add_argument("--k", type=int, default=1, help="matches per feature (default 1)")
    match.add_argument("--one-to-one", action="store_true", help="linear assignment instead of top-k (equal widths)")
    match.add_argument("--out", help="CSV of the matches (default: a summary on stdout)")


def add_flow_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``flow`` on the ``hf-sae`` sub-parsers; its ``run`` default is :func:`run_flow_command`."""
    parser = subparsers.add_parser("flow", help=HELP, description=HELP)
    add_flow_arguments(parser)
    parser.set_defaults(run=run_flow_command)
    return parser


def _flow(args: argparse.Namespace):
    cache = args.cache_dir
    if cache is not None and cache.lower() == "none":
        cache = False
    return FeatureFlow.from_pretrained(
        args.repo,
        revision=args.revision,
        t_resid=args.t_resid,
        t_mlp=args.t_mlp,
        t_attn=args.t_attn,
        t_module=args.t_module,
        block_size=args.block_size,
        device=args.device,
        cache_dir=cache,
    )


def _run_trace(args: argparse.Namespace) -> int:
    bad = [out for out in args.out if Path(out).suffix.lower() not in GRAPH_FORMATS]
    if bad:
        raise FlowError(f"--out {bad[0]}: unknown format; use one of {list(GRAPH_FORMATS)}.")
    flow = _flow(args)
    graph = flow.trace(args.layer, args.feature, direction=args.direction, max_steps=args.max_steps)
    for out in args.out:
        suffix = Path(out).suffix.lower()
        if suffix == ".html":
            graph_to_html(graph, out)
        elif suffix == ".json":
            to_json(graph, out)
        elif suffix == ".graphml":
            to_graphml(graph, out)
        else:
            plot_graph(graph, out)
        print(f"wrote {out}")
    layers = sorted({a["layer"] for _, a in graph.nodes(data=True)})
    missing = f"; no SAE for {graph.graph['missing']}" if graph.graph.get("missing") else ""
    print(
        f"{graph.graph['target']}: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, layers "
        f"{layers[0]}-{layers[-1]}{missing}"
    )
    return 0


def _run_table(args: argparse.Namespace) -> int:
    flow = _flow(args)
    summary = flow.summary(args.layer)
    print(summary)
    if args.out:
        buffer = io.StringIO()
        for i, layer in enumerate(summary.layers):
            text = summary.tables[layer].to_csv()
            buffer.write(text if i == 0 else text.split("\n", 1)[1])
        write_text_atomic(args.out, buffer.getvalue())
        print(f"wrote {args.out}")
    if args.plot:
        summary.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_match(args: argparse.Namespace) -> int:
    flow = _flow(args)
    result = flow.match(args.source, args.target, args.k, one_to_one=args.one_to_one)
    top = result.scores[:, 0]
    print(
        f"{args.source} -> {args.target}: {len(result)} features, k={result.k}; top-1 cosine mean {top.mean():.4f}, "
        f"median {top.median():.4f}, >= 0.5: {int((top >= 0.5).sum())}, >= 0.9: {int((top >= 0.9).sum())}"
    )
    if args.out:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["feature"] + [f"{name}_{i + 1}" for i in range(result.k) for name in ("match", "cosine")])
        for feature, (ids, scores) in enumerate(zip(result.indices.tolist(), result.scores.tolist())):
            writer.writerow([feature] + [v for pair in zip(ids, (f"{s:.6f}" for s in scores)) for v in pair])
        write_text_atomic(args.out, buffer.getvalue())
        print(f"wrote {args.out}")
    return 0


def run_flow_command(args: argparse.Namespace) -> int:
    """Run ``hf-sae flow {trace,table,match}``; returns the exit code. User errors raise a ``FlowError`` (an
    ``HfSaeError``, a ``ValueError``) or an ``OSError``, which the ``hf-sae`` main turns into one error line."""
    runners = {"trace": _run_trace, "table": _run_table, "match": _run_match}
    return runners[args.flow_command](args)


FLOW_SUBCOMMAND = (HELP, add_flow_arguments, run_flow_command)
