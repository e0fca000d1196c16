#!/usr/bin/env bash
# Installs Debian's `chromium` (headless browser) when it is missing: the report test renders
# report.html in it and checks the screenshot and the rendered DOM. Needs apt-get and root (or
# sudo without a password); where neither is available it says so and leaves the test to skip
# with a printed message.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "scripts/chromium.sh: no apt-get here; the report_html browser test will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "scripts/chromium.sh: not root and no password-less sudo; cannot install chromium" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists of a fresh container are empty: update once, then install.
if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
command -v chromium >/dev/null
echo "scripts/chromium.sh: $(chromium --version 2>/dev/null || echo chromium installed)"
