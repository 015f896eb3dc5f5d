"""Screenshots of a feature dashboard in a real headless Chromium: the index and one feature page.

    hf-sae dashboard runs/my-run --out dash                      # build the site first
    python examples/dashboard_screenshots.py dash --out docs     # docs/dashboard_index.png, docs/dashboard_feature.png
    python examples/dashboard_screenshots.py dash --feature 123 --query music

The feature page shown is ``--feature``, else the ``--rank``-th feature of the index (sorted by firing density).
``--query`` types into the search box before the index screenshot. Chromium comes from PATH (or Debian's package,
installed with apt-get when missing; see hf_sae.testing.chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_sae.testing.chromium import HeadlessChromium, chromium_executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", help="a dashboard folder (holding index.html)")
    parser.add_argument("--out", default="docs", help="folder for the two PNGs (default docs)")
    parser.add_argument("--feature", type=int, help="the feature page to show")
    parser.add_argument("--rank", type=int, default=5, help="else the feature at this place of the index (default 5)")
    parser.add_argument("--query", help="text typed into the search box for the index picture")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    executable, why = chromium_executable()
    if executable is None:
        raise SystemExit(f"no Chromium: {why}")
    index = (Path(args.site) / "index.html").resolve().as_uri()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with HeadlessChromium(executable, width=args.width, height=args.height) as browser:
        browser.open(index, ready="document.body.dataset.ready === '1'")
        feature = args.feature
        if feature is None:
            feature = browser.evaluate(f"HFSAE.data.index.features[{args.rank}][0]")
        if args.query:
            browser.type_text("#search", args.query)
        browser.screenshot(out / "dashboard_index.png", full_page=False)
        browser.open(f"{index}#f/{feature}", ready="!!document.getElementById('feature-title')")
        browser.wait_for(
            "document.querySelectorAll('#contexts .ctx').length > 0 || !document.getElementById('contexts')"
        )
        browser.screenshot(out / "dashboard_feature.png")
    local = all(url.startswith("file://") for url in browser.requests)
    print(
        f"wrote {out / 'dashboard_index.png'} and {out / 'dashboard_feature.png'} (feature {feature}); "
        f"{len(browser.requests)} requests, all local files: {local}"
    )


if __name__ == "__main__":
    main()
