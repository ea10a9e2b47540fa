#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need (deploy/setup-dev.sh),
# then runs every unit, component and end-to-end test with nextest (arguments go to
# nextest, e.g. a test name filter). There are no #[ignore]d stress tests: load and
# flood figures come from the benchmarks under bench/ (bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-dev.sh
exec cargo nextest run --workspace --no-fail-fast "$@"
