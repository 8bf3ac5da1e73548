#!/usr/bin/env bash
# Try tandem on Flower's deployment engine on one machine: a SuperLink and N
# SuperNodes on loopback.
#   scripts/deploy-local.sh start [N]            INSECURE (no TLS, no node auth):
#                                                loopback trials only; connection "deploy"
#   scripts/deploy-local.sh start [N] --secure   TLS (a private CA, server certificate
#                                                for localhost/127.0.0.1) and SuperNode
#                                                authentication (each node's key
#                                                registered first); connection
#                                                "deploy-secure" in .flwr/deploy-secure/cli
#   scripts/deploy-local.sh stop
# Then, from the repository root: . scripts/env.sh && flwr run . deploy --stream
# or (secure) FLWR_HOME=.flwr/deploy-secure/cli flwr run . deploy-secure --stream.
# Run inside the project's virtual environment.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
node_port0=39210      # SuperNode i listens on node_port0 + i

stop() {
  for state in "$root/.flwr/deploy" "$root/.flwr/deploy-secure"; do
    [ -d "$state" ] || continue
    for pidfile in "$state"/*.pid; do
      [ -e "$pidfile" ] || continue
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      pkill -f -- "--parent-pid $pid" 2>/dev/null || true   # its flower-superexec
      rm -f "$pidfile"
    done
  done
}

case "${1:-}" in
  start)
    n="${2:-2}"
    secure="${3:-}"
    stop
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
    cd "$root"
    if [ "$secure" = "--secure" ]; then
      state="$root/.flwr/deploy-secure"; port=39201     # as in flwr.toml [superlink.deploy-secure]
      mkdir -p "$state"
      python -c "from pathlib import Path; from tandem.certs import make_tls_files; make_tls_files(Path('$state/tls'))"
      mkdir -p "$state/cli"
      printf '[superlink]\ndefault = "deploy-secure"\n\n[superlink.deploy-secure]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
          "$port" "$state/tls/ca.crt" >"$state/cli/config.toml"
      link_security=(--ssl-ca-certfile "$state/tls/ca.crt" --ssl-certfile "$state/tls/server.pem"
                     --ssl-keyfile "$state/tls/server.key" --enable-supernode-auth)
    else
      state="$root/.flwr/deploy"; port=39200            # as in flwr.toml [superlink.deploy]
      mkdir -p "$state"
      link_security=(--insecure)
    fi
    flower-superlink "${link_security[@]}" --host 127.0.0.1 --port "$port" \
        --database "$state/state.db" >"$state/superlink.log" 2>&1 &
    echo $! >"$state/superlink.pid"
    sleep 3
    for i in $(seq 0 $((n - 1))); do
      mkdir -p "$state/node$i"
      node_security=(--insecure)
      if [ "$secure" = "--secure" ]; then
        python -c "from pathlib import Path; from tandem.certs import make_node_key; make_node_key(Path('$state/keys/node$i'))"
        FLWR_HOME="$state/cli" flwr supernode register "$state/keys/node$i.pub" deploy-secure >/dev/null
        node_security=(--root-certificates "$state/tls/ca.crt"
                       --auth-supernode-private-key "$state/keys/node$i")
      fi
      FLWR_HOME="$state/node$i" flower-supernode "${node_security[@]}" \
          --superlink "127.0.0.1:$port" --host 127.0.0.1 --port $((node_port0 + i)) \
          --node-config "partition-id=$i num-partitions=$n" \
          >"$state/node$i.log" 2>&1 &
      echo $! >"$state/node$i.pid"
    done
    echo "SuperLink on 127.0.0.1:$port with $n SuperNodes${secure:+ (TLS + node auth)}; logs in $state"
    ;;
  stop)
    stop
    echo "stopped"
    ;;
  *)
    echo "usage: $0 start [N] [--secure] | stop" >&2
    exit 2
    ;;
esac
