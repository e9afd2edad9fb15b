#!/usr/bin/env bash
# Make sure a headless-capable Chromium is at /usr/bin/chromium (Debian's package), for the browser tests and
# plotly's image export. Idempotent and quiet: does nothing when it is already there.
set -euo pipefail
BROWSER=/usr/bin/chromium
[ -x "$BROWSER" ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_browser: $BROWSER is missing and installing it needs root (apt-get install chromium)" >&2; exit 1
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "ensure_browser: installing chromium with apt-get failed" >&2; exit 1
fi
if [ ! -x "$BROWSER" ]; then
  echo "ensure_browser: apt-get installed chromium but $BROWSER is not there" >&2; exit 1
fi
echo "ensure_browser: installed $("$BROWSER" --version 2>/dev/null || echo chromium)"
