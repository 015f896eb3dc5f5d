"""Feature flow: data-free mapping of SAE features across layers, flow graphs, and steering along them.

Laptev et al., "Analyze Feature Flow to Enhance Interpretation and Steering in Language Models" (ICML 2025);
Balagansky et al., "Mechanistic Permutability: Match Features Across Layers" (ICLR 2025).

    from hf_sae.flow import FeatureFlow
    flow = FeatureFlow.from_pretrained("me/gemma-2-2b-saes")
    g = flow.trace(layer=12, feature=1234)
"""

from ..errors import FlowError
from .evaluation import (
    GROUPS,
    DeactivationResult,
    SkipLayerResult,
    ValidationResult,
    annotate_top_tokens,
    deactivation,
    mean_nonzero_activations,
    skip_layer_eval,
    transcode,
    validate,
)
from .feature_flow import FLOW_SITES, FeatureFlow, parse_key
from .graph import from_json, node_id, parse_node_id, to_graphml, to_json, trace
from .matching import (
    DEFAULT_BLOCK_SIZE,
    MatchCache,
    MatchResult,
    decoder_fingerprint,
    feature_scales,
    fold_jumprelu,
    match_decoders,
    match_features,
    one_to_one_match,
    unit_rows,
)
from .plotting import graph_to_html, plot_graph, plot_summary
from .predecessors import CLASSES, FlowSummary, PredecessorTable, class_label, classify
from .steering import (
    SCHEDULES,
    FlowSteeringHandle,
    FlowSteeringPlan,
    plan_flow_steering,
    schedule_coefficient,
    steer_flow,
)

__all__ = [
    "CLASSES",
    "DEFAULT_BLOCK_SIZE",
    "FLOW_SITES",
    "GROUPS",
    "SCHEDULES",
    "DeactivationResult",
    "FeatureFlow",
    "FlowError",
    "FlowSteeringHandle",
    "FlowSteeringPlan",
    "FlowSummary",
    "MatchCache",
    "MatchResult",
    "PredecessorTable",
    "SkipLayerResult",
    "ValidationResult",
    "annotate_top_tokens",
    "class_label",
    "classify",
    "deactivation",
    "decoder_fingerprint",
    "feature_scales",
    "fold_jumprelu",
    "from_json",
    "graph_to_html",
    "match_decoders",
    "match_features",
    "mean_nonzero_activations",
    "node_id",
    "one_to_one_match",
    "parse_key",
    "parse_node_id",
    "plan_flow_steering",
    "plot_graph",
    "plot_summary",
    "schedule_coefficient",
    "skip_layer_eval",
    "steer_flow",
    "to_graphml",
    "to_json",
    "trace",
    "transcode",
    "unit_rows",
    "validate",
]
