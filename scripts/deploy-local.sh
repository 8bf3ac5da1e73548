#!/usr/bin/env bash
# Try tandem on Flower's deployment engine on one machine: a SuperLink and N
# SuperNodes on loopback, INSECURE (no TLS, no node auth): loopback trials only.
# Usage: scripts/deploy-local.sh start [N]   |   scripts/deploy-local.sh stop
# Then: . scripts/env.sh && flwr run . deploy --stream
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
state="$root/.flwr/deploy"
port=39200            # must match [superlink.deploy] address in flwr.toml
node_port0=39210      # SuperNode i listens on node_port0 + i

stop() {
  if [ -d "$state" ]; then
    for pidfile in "$state"/*.pid; do
      [ -e "$pidfile" ] || continue
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      pkill -f -- "--parent-pid $pid" 2>/dev/null || true   # its flower-superexec
      rm -f "$pidfile"
    done
  fi
}

case "${1:-}" in
  start)
    n="${2:-2}"
    stop
    mkdir -p "$state"
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
    cd "$root"
    flower-superlink --insecure --host 127.0.0.1 --port "$port" \
        --database "$state/state.db" >"$state/superlink.log" 2>&1 &
    echo $! >"$state/superlink.pid"
    sleep 3
    for i in $(seq 0 $((n - 1))); do
      mkdir -p "$state/node$i"
      FLWR_HOME="$state/node$i" flower-supernode --insecure \
          --superlink "127.0.0.1:$port" --host 127.0.0.1 --port $((node_port0 + i)) \
          --node-config "partition-id=$i num-partitions=$n" \
          >"$state/node$i.log" 2>&1 &
      echo $! >"$state/node$i.pid"
    done
    echo "SuperLink on 127.0.0.1:$port with $n SuperNodes; logs in $state"
    ;;
  stop)
    stop
    echo "stopped"
    ;;
  *)
    echo "usage: $0 start [N] | stop" >&2
    exit 2
    ;;
esac
