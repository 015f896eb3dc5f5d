"""The feature dashboard: the one-pass collector against direct computations, the site's data and HTML, the CLI,
and the site in a real headless Chromium (index, a feature page, search, no request leaving the files)."""

import json
import math
from pathlib import Path

import pytest
import torch

from hf_sae.cli import main
from hf_sae.dashboard import build_dashboard, split_windows
from hf_sae.dashboard_collect import FeatureActivationCollector
from hf_sae.dashboard_flow import flow_neighbours
from hf_sae.dashboard_logits import logit_effects
from hf_sae.evaluation import feature_stats, max_activating_examples
from hf_sae.flow import FeatureFlow
from hf_sae.testing.chromium import HeadlessChromium, chromium_executable
from hf_sae.testing.tiny_models import tiny_gemma3, tiny_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def read_data(path: Path):
    """The payload of a data file ``HFSAE.add("kind", {...});``."""
    text = path.read_text()
    assert text.startswith("HFSAE.add(") and text.rstrip().endswith(");")
    kind, payload = text[len("HFSAE.add(") : text.rstrip().rindex(");")].split(", ", 1)
    return json.loads(kind), json.loads(payload)


def random_texts(n: int = 24, seed: int = 0, low: int = 6, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [[2] + torch.randint(3, 1000, (length,), generator=g).tolist() for length in lengths]


# --------------------------------------------------------------------------------------------------- collector
def test_collector_hand_computed_case():
    """Feature 0 fires 3.0 (window 0, token 1), 5.0 and 1.5 (window 1, tokens 4, 5); feature 2 fires 0.75 once.
    frexp(5.0) = 0.625 * 2^3, so feature 0's histogram covers [0, 8) in 4 bins of width 2: 1.5 | 3.0 | 5.0 | -."""
    collector = FeatureActivationCollector(d_sae=3, n_examples=2, bins=4)
    values = torch.tensor([[0.0], [3.0], [0.0], [0.0], [5.0], [1.5]])
    indices = torch.tensor([[0], [0], [0], [0], [0], [0]])
    windows = torch.tensor([0, 0, 0, 1, 1, 1])
    collector.update(values[:3], indices[:3], torch.arange(3), windows[:3])
    collector.update(values[3:], indices[3:], torch.arange(3, 6), windows[3:])
    collector.update(torch.tensor([[0.75, 0.0]]), torch.tensor([[2, 1]]), torch.tensor([6]), torch.tensor([2]))
    result = collector.result()
    assert result.n_tokens == 7
    assert result.top_values[0].tolist() == [5.0, 3.0]  # one example per window: window 1's peak, then window 0's
    assert result.top_tokens[0].tolist() == [4, 1] and result.top_windows[0].tolist() == [1, 0]
    assert result.histogram[0].tolist() == [1, 1, 1, 0] and float(result.histogram_top[0]) == 8.0
    assert result.histogram[2].tolist() == [0, 0, 0, 1] and float(result.histogram_top[2]) == 1.0  # 0.75 in [.75, 1)
    assert result.count.tolist() == [3, 0, 1] and result.histogram[1].sum() == 0 and result.top_tokens[1, 0] == -1
    assert result.density.tolist() == pytest.approx([3 / 7, 0, 1 / 7])
    assert result.mean_activation.tolist() == pytest.approx([9.5 / 3, 0, 0.75])
    assert result.values_at(torch.tensor([4, 5, 3, -1]), torch.tensor(0)).tolist() == [5.0, 1.5, 0.0, 0.0]


@pytest.mark.parametrize("windows_per_update", [1, 3, 40])
def test_collector_matches_a_direct_computation(windows_per_update):
    """Top windows (peak per window, ties to the earlier token) and power-of-two histograms equal a dense,
    per-feature computation, however the windows are batched."""
    torch.manual_seed(0)
    d_sae, n_windows, length, k, bins = 40, 40, 16, 3, 8
    n = n_windows * length
    values = (torch.rand(n, k) * 6).round(decimals=1)  # rounding makes ties
    values[values < 2] = 0
    indices = torch.stack([torch.randperm(d_sae)[:k] for _ in range(n)])
    tokens, windows = torch.arange(n), torch.arange(n) // length
    collector = FeatureActivationCollector(d_sae, n_examples=4, bins=bins)
    for first in range(0, n_windows, windows_per_update):
        rows = (windows >= first) & (windows < first + windows_per_update)
        collector.update(values[rows], indices[rows], tokens[rows], windows[rows])
    result = collector.result()
    dense = torch.zeros(n, d_sae).scatter_(1, indices, values)
    for feature in range(d_sae):
        column = dense[:, feature]
        fired = column[column > 0]
        assert int(result.count[feature]) == fired.numel()
        if not fired.numel():
            continue
        top = 2.0 ** math.frexp(float(fired.max()))[1]
        expected = torch.bincount((fired.double() / top * bins).floor().long(), minlength=bins)
        assert result.histogram[feature].tolist() == expected.tolist()
        assert float(result.histogram_top[feature]) == top
        per_window = column.view(n_windows, length)
        peaks = [(-float(per_window[w].max()), w * length + int(per_window[w].argmax())) for w in range(n_windows)]
        peaks = sorted(p for p in peaks if p[0] < 0)[:4]  # largest first, then the earlier token
        assert result.top_tokens[feature, : len(peaks)].tolist() == [t for _, t in peaks]
        assert result.top_values[feature, : len(peaks)].tolist() == [-v for v, _ in peaks]


# ------------------------------------------------------------------------------------------------- the builder
@pytest.fixture(scope="module")
def model():
    return tiny_gemma3(seed=0)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(layer=1, d_sae=96, k=4)


@pytest.fixture(scope="module")
def built(model, sae, tmp_path_factory):
    texts = random_texts()
    out = tmp_path_factory.mktemp("dashboard") / "site"
    dashboard = build_dashboard(model, sae, texts, out, context_length=64, n_examples=5, bins=16, progress=False)
    return dashboard, texts


def test_top_contexts_are_the_max_activating_examples(built, model, sae):
    """Texts shorter than a window are one window each, so a feature's top contexts are
    max_activating_examples' (one per text, at its peak)."""
    dashboard, texts = built
    starts = torch.tensor([0] + [len(t) for t in texts]).cumsum(0)
    for feature in range(0, sae.config.d_sae, 7):
        examples = max_activating_examples(model, sae, feature, texts, n=5, max_length=None)
        values = dashboard.activations.top_values[feature]
        tokens = dashboard.activations.top_tokens[feature]
        assert [float(v) for v in values if v > -math.inf] == pytest.approx([e.activation for e in examples])
        assert tokens[: len(examples)].tolist() == [int(starts[e.text_index]) + e.position for e in examples]


def test_histogram_density_and_mean_against_a_direct_computation(built, model, sae):
    dashboard, texts = built
    result = dashboard.activations
    rows = []
    for ids in texts:
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]  # after layer 1
        rows.append(hidden[1:])  # BOS is not counted
    with torch.no_grad():
        dense = sae.encode_dense(torch.cat(rows))
    assert result.n_tokens == dense.shape[0] == sum(len(t) - 1 for t in texts)
    for feature in range(sae.config.d_sae):
        fired = dense[:, feature][dense[:, feature] > 0]
        assert int(result.count[feature]) == fired.numel()
        if fired.numel():
            top = 2.0 ** math.frexp(float(fired.max()))[1]
            expected = torch.bincount((fired.double() / top * 16).floor().long().clamp_max(15), minlength=16)
            assert result.histogram[feature].tolist() == expected.tolist()
            assert float(result.mean_activation[feature]) == pytest.approx(float(fired.mean()), rel=1e-5)
    stats = feature_stats(model, sae, texts, max_length=None, store=False)
    assert result.density.float().tolist() == pytest.approx(stats.density.tolist())


def test_logit_effects_follow_the_real_final_norm_and_head(model, sae):
    """The ranking of W_U · (g ⊙ d) is the ranking of the model's own lm_head(norm(d)): the norm's 1/rms is a
    positive factor. bfloat16 ranking with float32 re-scoring gives the same tokens and values here."""
    effects = logit_effects(model, sae, n=5, features=torch.arange(10))
    fast = logit_effects(model, sae, n=5, features=torch.arange(10), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(sae.W_dec[:10]))
        gain = 1 + model.model.norm.weight  # Gemma's RMSNorm scales by (1 + weight)
        direct = (sae.W_dec[:10] * gain) @ model.lm_head.weight.T
    assert effects.promoted_ids.tolist() == logits.topk(5, dim=1).indices.tolist()
    assert effects.suppressed_ids.tolist() == logits.topk(5, dim=1, largest=False).indices.tolist()
    assert effects.promoted_values == pytest.approx(direct.gather(1, effects.promoted_ids), rel=1e-4, abs=1e-5)
    assert fast.promoted_ids.tolist() == effects.promoted_ids.tolist()
    assert fast.suppressed_values == pytest.approx(effects.suppressed_values, rel=1e-5, abs=1e-6)


def test_flow_neighbours_are_the_one_step_trace(sae):
    """Each feature's neighbours are the nodes trace(layer, f, max_steps=1) links to it by one edge."""
    saes = {(0, "resid"): tiny_sae(0, d_sae=48, seed=3), (1, "resid"): sae, (2, "resid"): tiny_sae(2, d_sae=64, seed=4)}
    saes[(1, "mlp")] = tiny_sae(1, "mlp", d_sae=32, seed=5)
    flow = FeatureFlow(saes, t_resid=0.25, t_module=0.2, cache_dir=False)
    neighbours, classes = flow_neighbours(flow, sae)
    assert sum(map(len, neighbours)) > 0
    for feature in range(sae.config.d_sae):
        graph = flow.trace(1, feature, max_steps=1)
        target = f"1/resid/{feature}"
        expected = set(graph.predecessors(target)) | set(graph.successors(target))
        assert {n["node"] for n in neighbours[feature]} == expected
        assert classes[feature] == graph.nodes[target]["class"]
        for n in neighbours[feature]:
            edge = graph.edges[n["node"], target] if n["relation"] != "resid after" else graph.edges[target, n["node"]]
            assert n["cosine"] == pytest.approx(edge["cosine"])
    fed: dict[int, set] = {}  # an mlp feature's neighbours: the resid features whose trace attaches it
    for feature in range(sae.config.d_sae):
        for node in flow.trace(1, feature, max_steps=0).predecessors(f"1/resid/{feature}"):
            if node.startswith("1/mlp/"):
                fed.setdefault(int(node.split("/")[-1]), set()).add(f"1/resid/{feature}")
    module_neighbours, _ = flow_neighbours(flow, saes[(1, "mlp")])
    assert fed and max(map(len, fed.values())) <= 8
    assert {m: {n["node"] for n in found} for m, found in enumerate(module_neighbours) if found} == fed


def test_site_files_index_and_pages(built, sae):
    """index.html loads only local scripts; the index lists every feature by density (descending); each fired
    feature has a page whose contexts point into the token file at the peaks the pass found."""
    dashboard, texts = built
    site = dashboard.path
    html = (site / "index.html").read_text()
    assert "connect-src 'none'" in html and 'id="search"' in html
    for line in html.splitlines():  # nothing to fetch: the only URL is the SVG namespace name
        assert "https://" not in line and ("http://" not in line or "http://www.w3.org/2000/svg" in line)
    _, index = read_data(site / "data" / "index.js")
    _, tokens = read_data(site / "data" / "tokens.js")
    rows = index["features"]
    assert sorted(r[0] for r in rows) == list(range(sae.config.d_sae))
    densities = [r[1] for r in rows]
    assert densities == sorted(densities, reverse=True)
    assert tokens["ids"] == [t for text in texts for t in text]
    pages = {}
    for path in sorted((site / "data" / "features").glob("*.js")):
        pages.update(read_data(path)[1])
    fired = (dashboard.activations.count > 0).nonzero().flatten().tolist()
    assert sorted(map(int, pages)) == fired
    for feature in fired[:20]:
        page = pages[str(feature)]
        assert sum(page["hist"]) == int(dashboard.activations.count[feature])
        first_start, first_peak, first_value, first_values = page["contexts"][0]
        assert first_peak == int(dashboard.activations.top_tokens[feature, 0])
        assert first_value == pytest.approx(float(dashboard.activations.top_values[feature, 0]), rel=1e-4)
        assert first_values[first_peak - first_start] == pytest.approx(first_value, rel=1e-3)
        assert len(page["promoted"]) == len(page["suppressed"]) == 10


def test_split_windows_restart_with_bos_and_refusals(model, sae, tmp_path):
    assert split_windows([[2, 5, 6, 7, 8, 9]], 3, 2) == [[2, 5, 6], [2, 7, 8], [2, 9]]
    assert split_windows([[5, 6, 7]], 2, 2) == [[5, 6], [7]]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_dashboard(model, sae, random_texts(2), tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="features must be ids"):
        build_dashboard(model, sae, random_texts(2), tmp_path / "new", features=[999], progress=False)


def test_dashboard_command_on_a_saved_sae(saved_lm, tmp_path, capsys):
    """hf-sae dashboard RUN --model ... --texts ... --out DIR writes the site of a saved SAE."""
    model_dir, docs = saved_lm
    sae_dir = tmp_path / "sae"
    tiny_sae(layer=2, d_sae=64, k=4, base_model=str(model_dir)).save_pretrained(sae_dir)
    out = tmp_path / "site"
    args = ["dashboard", str(sae_dir), "--model", str(model_dir), "--texts", str(docs), "--out", str(out)]
    assert main(args + ["--tokens", "2000", "--context-length", "64"]) == 0
    assert "feature pages" in capsys.readouterr().out
    _, tokens = read_data(out / "data" / "tokens.js")
    assert 2000 <= len(tokens["ids"]) < 2064 and "the" in {t.strip() for t in tokens["text"].values()}
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--tokens", "500", "--features", "0", "1"]) == 0
    assert len(list((out / "data" / "features").glob("*.js"))) == 1


def test_dashboard_command_with_a_flow_collection(saved_lm, tmp_path, monkeypatch):
    """--subfolder picks the SAE of a collection folder and --flow adds each page's flow neighbours."""
    monkeypatch.setenv("HF_SAE_CACHE", str(tmp_path / "cache"))  # the flow's match cache
    model_dir, docs = saved_lm
    for layer, seed in ((1, 3), (2, 4)):
        tiny_sae(layer=layer, d_sae=32, k=4, seed=seed, base_model=str(model_dir)).save_pretrained(
            tmp_path / "saes" / f"layer_{layer}" / "resid"
        )
    out = tmp_path / "site"
    args = ["dashboard", str(tmp_path / "saes"), "--subfolder", "layer_2/resid", "--flow", str(tmp_path / "saes")]
    args += ["--model", str(model_dir), "--texts", str(docs), "--out", str(out), "--tokens", "800"]
    assert main(args) == 0
    pages = read_data(out / "data" / "features" / "00000.js")[1]
    assert all("flow" in page and page["cls"] for page in pages.values())
    relations = {n["relation"] for page in pages.values() for n in page["flow"]}
    assert relations <= {"resid before"}


@pytest.mark.slow
def test_dashboard_command_defaults_to_the_embedded_gemma_and_corpus(tmp_path, capsys):
    """An SAE whose base_model is google/gemma-3-270m gets the embedded model and held-out text without options;
    the promoted tokens are real Gemma tokens."""
    from hf_sae import HierarchicalSAE, HierarchicalSAEConfig

    config = HierarchicalSAEConfig(
        d_in=640, d_sae=128, k=8, hook_layer=3, hook_site="resid", base_model="google/gemma-3-270m"
    )
    HierarchicalSAE(config).save_pretrained(tmp_path / "sae")
    out = tmp_path / "site"
    assert main(["dashboard", str(tmp_path / "sae"), "--out", str(out), "--tokens", "600"]) == 0
    assert "feature pages" in capsys.readouterr().out
    _, index = read_data(out / "data" / "index.js")
    assert "google/gemma-3-270m" in index["meta"]["short"]
    _, tokens = read_data(out / "data" / "tokens.js")
    assert tokens["ids"][0] == 2 and " the" in tokens["text"].values()  # BOS, then English


# ------------------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's executable: on PATH, else Debian's package installed now (once per session)."""
    executable, why = chromium_executable()
    if executable is None:
        pytest.skip(f"no headless Chromium: {why}")
    return executable


@pytest.fixture(scope="module")
def word_site(saved_lm, tmp_path_factory):
    """A dashboard of a tiny Gemma-2 with a real word-level tokenizer over real English documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, docs = saved_lm
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    out = tmp_path_factory.mktemp("word_site") / "site"
    sae = tiny_sae(layer=2, d_sae=64, k=4)
    return build_dashboard(lm, sae, texts, out, tokenizer=tokenizer, max_tokens=3000, context_length=64, progress=False)


def test_site_in_headless_chromium(chromium, word_site):
    """The index renders sorted by density, the search box filters by token text and by id, a feature page shows its
    contexts (peak highlighted), histogram and output tokens, and every request the page made was a local file."""
    index = word_site.index_html.as_uri()
    with HeadlessChromium(chromium) as browser:
        browser.open(index, ready="document.body.dataset.ready === '1'")
        ids = browser.evaluate(
            "Array.from(document.querySelectorAll('#index tr[data-feature]')).map(r => +r.dataset.feature)"
        )
        density = word_site.activations.density
        assert len(ids) == 64 and [float(density[i]) for i in ids] == sorted(density[ids].tolist(), reverse=True)
        busiest = ids[0]
        word = browser.evaluate(f"document.querySelector('tr[data-feature=\"{busiest}\"] td:last-child').textContent")
        query = word.split()[0]
        browser.type_text("#search", query)
        shown = browser.evaluate(
            "Array.from(document.querySelectorAll('#index tr[data-feature]')).map(r => r.lastChild.textContent)"
        )
        assert busiest in browser.evaluate(
            "Array.from(document.querySelectorAll('#index tr[data-feature]')).map(r => +r.dataset.feature)"
        )
        assert shown and all(query.lower() in text.lower() for text in shown)
        browser.evaluate("document.getElementById('search').value = ''")
        browser.type_text("#search", str(busiest))
        assert browser.evaluate("document.querySelectorAll('#index tr[data-feature]').length") == 1
        browser.evaluate(f"document.querySelector('tr[data-feature=\"{busiest}\"] a').click()")
        browser.wait_for("!!document.getElementById('feature-title')")
        assert browser.evaluate("document.getElementById('feature-title').textContent") == f"Feature {busiest}"
        n_contexts = int((word_site.activations.top_values[busiest] > -math.inf).sum())
        assert browser.evaluate("document.querySelectorAll('#contexts .ctx').length") == n_contexts
        assert browser.evaluate("document.querySelectorAll('#contexts .peak').length") == n_contexts
        assert browser.evaluate("document.querySelectorAll('svg rect').length") == 32
        assert browser.evaluate("document.querySelectorAll('#promoted tr').length") == 11
        numbers = browser.evaluate("[fmt(-630, 3), fmt(4.5), fmt(1165.3), fmt(0.0001234), fmt(0.25)]")
        assert numbers == ["-630", "4.5", "1,165", "1.23e-4", "0.25"]
        assert browser.console == []
    assert browser.requests and all(url.startswith("file://") for url in browser.requests), browser.requests
