#!/usr/bin/env bash
# The fault suite in full (tests/faults/): the federation down 10 minutes with a gateway
# restart, a 20 000-handshake flood per mode, and 60 s of endpoint churn at 100
# changes/s. Each scenario prints `name: value`.
# The README's test command runs the same scenarios in a short form.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/setup-dev.sh
MESHFED_FAULTS=full exec cargo nextest run --profile faults --test e2e --no-capture -E 'test(/^faults::/)' "$@"
