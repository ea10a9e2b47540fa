#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then runs every
# unit, component and end-to-end test with nextest. Stress tests are #[ignore]d; run
# them with: tests/run.sh --run-ignored only
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v kill >/dev/null || need+=(procps)
# The proto freshness test regenerates federation.proto with protoc.
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing packages: ${need[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
fi
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

exec cargo nextest run --workspace --no-fail-fast "$@"
