#!/usr/bin/env bash
# Installs the Debian packages that building and testing meshfed need, if missing:
#   protobuf-compiler  protoc, for etcd-client's build script and the proto freshness test
#   etcd-server        the real etcd the etcd-store tests and bench/catalog start
#   procps             kill, used by the end-to-end tests
#   dnsutils           dig, which the DNS tests query meshfed with
#   knot               Knot DNS: the legacy DNS server the UDP test reaches through the tunnel
#   systemd            systemd-analyze, which checks the units in deploy/systemd
#   kubernetes-client  kubectl, whose built-in kustomize renders deploy/kubernetes
#                      (skipped when a kubectl is already installed)
#   haproxy            the PROXY-protocol consumer the identity tests send to
#   openssl            s_client, a TLS client the caller-mTLS test presents an SVID with
#   nftables, iproute2 nft and ip: the outbound-only test puts a site in a network
#                      namespace whose firewall drops every new inbound connection;
#                      ss: the keepalive test reads the kernel's socket timers
#   prometheus         promtool, which lints the /metrics of the gateway and federation
#   chromium           a headless browser that renders the federation's topology page
#   python3-venv       for /opt/meshfed-tools, a venv holding kubernetes-validate (PyPI),
#                      which checks the rendered manifests against the Kubernetes schemas,
#                      spiffe (py-spiffe, which parses the served SPIFFE bundles),
#                      grpcio (a gRPC server and client for the `grpc` port test),
#                      h2 (an HTTP/2 client library: the rapid-reset test's attacker, and the RFC 8441 client),
#                      websockets (a WebSocket server and client for the WebSocket tests),
#                      wsproto (WebSocket frames for the RFC 8441 client over h2)
# Idempotent and quiet when everything is there. Needs root to install.
set -euo pipefail

need=()
command -v kill >/dev/null || need+=(procps)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
command -v dig >/dev/null || need+=(dnsutils)
command -v knotd >/dev/null || need+=(knot)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ss >/dev/null || need+=(iproute2)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
tools=/opt/meshfed-tools
{ [ -x "$tools/bin/kubernetes-validate" ] && "$tools/bin/python" -c 'import spiffe' 2>/dev/null; } || python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing packages: ${need[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
fi
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
if [ ! -x "$tools/bin/kubernetes-validate" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q kubernetes-validate==1.37.0
fi
"$tools/bin/python" -c 'import spiffe' 2>/dev/null || "$tools/bin/pip" install -q spiffe==0.3.2
"$tools/bin/python" -c 'import grpc' 2>/dev/null || "$tools/bin/pip" install -q grpcio==1.76.0
"$tools/bin/python" -c 'import h2' 2>/dev/null || "$tools/bin/pip" install -q h2==4.4.1
"$tools/bin/python" -c 'import websockets' 2>/dev/null || "$tools/bin/pip" install -q websockets==15.0.1
"$tools/bin/python" -c 'import wsproto' 2>/dev/null || "$tools/bin/pip" install -q wsproto==1.3.2
