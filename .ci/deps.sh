#!/usr/bin/env bash
# The crate dependency rules of ARCHITECTURE.md, checked at build level (cargo tree, normal
# dependencies, the whole tree below each crate). Exits 1 naming every broken rule.
#
# Enforced now:
#   - meshfed-identity depends on no other meshfed crate;
#   - meshfed-catalog has no async runtime, RPC, HTTP, QUIC, etcd or Kubernetes dependency,
#     and no meshfed crate but identity.
# Added when the federation split (issue 14) lands: meshfed-gateway and meshfed-dns depend
# on neither kube, k8s-openapi, etcd-client nor the federation server; the gateway does not
# depend on meshfed-dns.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
deps() {
  local out
  # A failing cargo tree must not pass every rule by listing nothing.
  out=$(cargo tree -q -p "$1" -e normal --prefix none) || { echo "cargo tree -p $1 failed" >&2; exit 2; }
  awk '{print $1}' <<<"$out" | sort -u
}
forbid() { # crate, then forbidden dependency names
  local crate=$1; shift
  local have; have=$(deps "$crate")
  for d in "$@"; do
    if grep -qx "$d" <<<"$have"; then
      echo "rule broken: $crate depends on $d (cargo tree -p $crate -i $d)"
      fail=1
    fi
  done
}
forbid meshfed-identity meshfed-catalog meshfed-federation meshfed-gateway meshfed-dns
forbid meshfed-catalog tokio tonic prost hyper h2 quinn etcd-client kube k8s-openapi \
  meshfed-federation meshfed-gateway meshfed-dns
if [ "$fail" = 0 ]; then echo "crate dependency rules hold"; fi
exit "$fail"
