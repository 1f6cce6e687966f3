#!/usr/bin/env bash
# Re-take the committed screenshots of two site pages (a method page, two API reference pages), as a reader sees
# them: headless Chromium (Debian package `chromium`) on the strict build. Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"
mkdir -p docs/img/site
for page in methods/edora api/configs api/lifecycle; do
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --no-first-run --user-data-dir="$(mktemp -d)" --window-size=1280,1600 --hide-scrollbars \
    --screenshot="docs/img/site/${page//\//-}.png" "file://$site/$page/index.html"
done
