#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need (deploy/setup-dev.sh),
# then runs every unit, component and end-to-end test with nextest. Stress tests are
# #[ignore]d; run them with: tests/run.sh --run-ignored only
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-dev.sh
exec cargo nextest run --workspace --no-fail-fast "$@"
