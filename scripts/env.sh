# Source this file (`. scripts/env.sh`) before `flwr run`: it points Flower at
# the project's own flwr.toml and sets the environment the local SuperLink needs.
_tandem_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export FLWR_HOME="$_tandem_root/.flwr"
mkdir -p "$FLWR_HOME"
ln -sf ../flwr.toml "$FLWR_HOME/config.toml"
# A project-specific port, so tandem's local SuperLink never serves another project.
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39291}"
export FLWR_LOCAL_CONTROL_API_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-39293}"
# Offline-safe Flower: no per-run dependency install, no update check, no telemetry.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
unset _tandem_root
