#!/usr/bin/env bash
# Builds every example plugin into plugins/dist/<name>.wasm (WebAssembly components).
#
# Two routes, the first that is available wins:
# 1. Debian's Rust (packages rustc-web cargo-web rust-web-src rust-web-llvm lld-22): builds std for
#    wasm32-unknown-unknown from source and links a component with wasm-component-ld.
#    Needs only apt and crates.io.
# 2. rustup with the wasm32-unknown-unknown target plus `wasm-tools` on PATH: builds a core
#    module and wraps it with `wasm-tools component new`.
# Cargo's own freshness check makes a rebuild with nothing changed take about a second.
set -euo pipefail
cd "$(dirname "$0")"

crates=(word-filter hmac-auth geo-router load-router hostile hostile-batch)
target=wasm32-unknown-unknown
linker=/usr/lib/rustlib/x86_64-unknown-linux-gnu/bin/wasm-component-ld
mkdir -p dist

if [[ -x /usr/bin/cargo && -x /usr/bin/rustc && -x "$linker" && -x /usr/lib/llvm-22/bin/wasm-ld && -d /usr/lib/rustlib/src/rust/library ]]; then
  # rustup's proxies come first on PATH; call Debian's cargo and rustc explicitly.
  # RUSTC_BOOTSTRAP lets the stable Debian compiler use -Z build-std (std is not shipped
  # prebuilt for this target).
  # wasm-component-ld runs wasm-ld, which Debian ships in lld-22.
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTUP_TOOLCHAIN= /usr/bin/cargo build --release --locked --quiet \
    --target "$target" -Z build-std=std,panic_abort \
    --config "target.$target.linker=\"$linker\"" \
    --config "target.$target.rustflags=[\"-Clink-arg=--wasm-ld-path=/usr/lib/llvm-22/bin/wasm-ld\"]"
  for c in "${crates[@]}"; do
    cp "target/$target/release/${c//-/_}.wasm" "dist/$c.wasm"
  done
elif rustup target list --installed 2>/dev/null | grep -qx "$target" && command -v wasm-tools >/dev/null; then
  cargo build --release --locked --quiet --target "$target"
  for c in "${crates[@]}"; do
    wasm-tools component new "target/$target/release/${c//-/_}.wasm" -o "dist/$c.wasm"
  done
else
  echo "plugins/build.sh: no WebAssembly toolchain found." >&2
  echo "  Debian: apt-get install -y --no-install-recommends rustc-web cargo-web rust-web-src rust-web-llvm lld-22" >&2
  echo "  rustup: rustup target add $target && cargo install wasm-tools" >&2
  exit 1
fi
ls -l dist/*.wasm | awk '{print $5, $9}'
