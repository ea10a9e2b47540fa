#!/usr/bin/env bash
# Fuzz smoke: every target in fuzz/fuzz_targets, SECS seconds each (default 20),
# coverage-guided by libFuzzer through cargo-fuzz. It runs on the pinned stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and there is no
# sanitizer (`-s none`: a machine here has one toolchain, and meshfed's crates forbid
# unsafe code). Seeds: tests/data for the YAML targets, http_policy, wire and hbone_open. A crash fails the run, and
# libFuzzer leaves the input in fuzz/artifacts/<target>/. Last lines, per target:
#   fuzz_<target>_runs: N
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
declare -A runs
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  seeds=()
  case "$t" in
    istio_yaml) seeds=(../tests/data/serviceentry ../tests/data/gatewayapi ../tests/data/authorization) ;;
    http_policy) seeds=(../tests/data/http_policy) ;;
    wire) seeds=(../tests/data/wire) ;;
    hbone_open) seeds=(../tests/data/hbone) ;;
  esac
  log=$(mktemp)
  if ! cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs[$t]=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
  rm -f "$log"
done
for t in "${!runs[@]}"; do
  echo "fuzz_${t}_runs: ${runs[$t]}"
done | sort
