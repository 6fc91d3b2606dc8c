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

# The WebAssembly plugin toolchain (see plugins/build.sh).
apt_install rustc-web cargo-web rust-web-src rust-web-llvm lld-22
plugins/build.sh >/dev/null

cargo test --locked --all-targets "$@"
