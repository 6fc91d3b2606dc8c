#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one. Installs what the tests need
# when it is missing (nothing beyond the Rust toolchain for now), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo test --locked --all-targets "$@"
