#!/usr/bin/env bash
# The crate dependency rules of ARCHITECTURE.md, checked at build level (cargo tree, normal
# and build dependencies, the whole tree below each crate). Exits 1 naming every broken
# rule.
#
#   - identity depends on no other meshfed crate;
#   - catalog and istio have no async runtime, RPC, HTTP, QUIC, etcd or Kubernetes
#     dependency; catalog depends on identity only, istio on catalog only;
#   - api (the federation's wire form and client) has no server, store, etcd or
#     Kubernetes;
#   - the gateway and dns depend on neither kube, k8s-openapi, etcd-client, protoc's
#     prost-build, the federation server (meshfed-federation) nor the sources; the gateway
#     does not depend on dns, nor dns on the gateway or the federation's API;
#   - lifecycle (admin port, signals, drain) depends on no meshfed crate, lab (fixtures)
#     on identity only;
#   - nothing but the binary and the benchmarks depends on the fixtures (meshfed-lab).
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
deps() {
  local out
  # A failing cargo tree must not pass every rule by listing nothing.
  out=$(cargo tree -q -p "$1" -e normal,build --prefix none) || { echo "cargo tree -p $1 failed" >&2; exit 2; }
  awk '{print $1}' <<<"$out" | sort -u
}
forbid() { # crate, then forbidden dependency names
  local crate=$1; shift
  local have; have=$(deps "$crate")
  for d in "$@"; do
    if grep -qx "$d" <<<"$have"; then
      echo "rule broken: $crate depends on $d (cargo tree -p $crate -e normal,build -i $d)"
      fail=1
    fi
  done
}
runtime_rpc=(tokio tonic prost hyper h2 quinn etcd-client kube k8s-openapi)
control=(kube k8s-openapi etcd-client prost-build meshfed-federation meshfed-istio meshfed-kubernetes meshfed-lab)
forbid meshfed-identity meshfed-catalog meshfed-api meshfed-federation meshfed-istio \
  meshfed-kubernetes meshfed-gateway meshfed-dns meshfed-lab
forbid meshfed-catalog "${runtime_rpc[@]}" meshfed-api meshfed-federation meshfed-istio \
  meshfed-kubernetes meshfed-gateway meshfed-dns meshfed-lab
forbid meshfed-istio "${runtime_rpc[@]}" meshfed-api meshfed-federation meshfed-kubernetes \
  meshfed-gateway meshfed-dns meshfed-lab
forbid meshfed-api etcd-client kube k8s-openapi prost-build meshfed-federation meshfed-istio \
  meshfed-kubernetes meshfed-gateway meshfed-dns meshfed-lab
forbid meshfed-gateway "${control[@]}" meshfed-dns
forbid meshfed-dns "${control[@]}" meshfed-gateway meshfed-api tonic quinn
forbid meshfed-federation meshfed-gateway meshfed-dns meshfed-istio meshfed-kubernetes meshfed-lab kube
forbid meshfed-lifecycle meshfed-identity meshfed-catalog meshfed-api meshfed-federation \
  meshfed-istio meshfed-kubernetes meshfed-gateway meshfed-dns meshfed-lab
forbid meshfed-lab meshfed-catalog meshfed-api meshfed-federation meshfed-istio \
  meshfed-kubernetes meshfed-gateway meshfed-dns meshfed-lifecycle
forbid meshfed-kubernetes meshfed-gateway meshfed-federation meshfed-api etcd-client meshfed-lab
if [ "$fail" = 0 ]; then echo "crate dependency rules hold"; fi
exit "$fail"
