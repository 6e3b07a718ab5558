#!/usr/bin/env bash
# FIRM on a Flower *deployment* federation, all on this machine: one SuperLink ("the server")
# and NUM_NODES SuperNodes ("the clients", two by default), each SuperNode training on its own
# prompt partition, then `flwr run` submits the app in this repository to them. It is the same
# ServerApp/ClientApp that `firm train` and `flwr run . local` run, at tiny sizes (2 clients x 2
# rounds, 2 prompts per client, 8 new tokens): about 7 minutes on a busy 2-core CPU, mostly spent
# starting a fresh ClientApp process (imports + model load) for every client in every round.
#
# Secure by default, as docs/deployment.md describes: the script makes a throw-away CA, a TLS
# certificate for the SuperLink (127.0.0.1/localhost) and one authentication key pair per SuperNode
# (`python -m firm.federation.certificates`) in its private work directory; the SuperLink runs
# with TLS and --enable-supernode-auth; each SuperNode's public key is registered with
# `flwr supernode register` before the node starts, and only registered nodes get in. Everything
# listens on 127.0.0.1. On real machines each SuperNode makes its own key pair and hands only its
# .pub file to the operator; install this package (and torch) on every machine: the apps are
# imported from the installed `firm`, the FAB that `flwr run` ships carries the run config.
#
# INSECURE=1 is the LOCAL-DEVELOPMENT mode: no TLS and no node authentication (`--insecure`
# everywhere), so anyone who reaches the port can join. Loopback only, never across a network.
#
# Usage:  scripts/flower_deployment_demo.sh             secure: TLS + SuperNode authentication
#         INSECURE=1 scripts/flower_deployment_demo.sh  local development only: no TLS, no auth
# Settings (environment variables, all optional):
#   INSECURE   1 = the local-development mode above (default: 0, secure)
#   PRESET     FIRM preset (default: "default" = embedded SmolLM2 policy + embedded rewards;
#              "simple-rewards" swaps in the offline relevance/civility rewards)
#   RUN_CONFIG FIRM settings as Flower run-config keys, "key=value key=value" with TOML values
#              (default: tiny sizes, see below; every key: docs/configuration.md)
#   RUN_DIR    where the run is written (default: runs/flower-deployment-<time> in this repo)
#   NUM_NODES  how many SuperNodes to start (default: 2); num-clients in RUN_CONFIG must match
#   VENV_BIN   directory with python, flwr, flower-superlink, flower-supernode, flower-superexec
#              (default: .venv/bin)
#   TIMEOUT_S  stop waiting for the run after this many seconds (default: 1800)
# Everything is stopped when the script ends, also on Ctrl-C or an error.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
PY="$VENV_BIN/python"
for tool in python flwr flower-superlink flower-supernode flower-superexec; do
    [[ -x "$VENV_BIN/$tool" ]] || { echo "error: $VENV_BIN/$tool not found (run 'make install' or set VENV_BIN)" >&2; exit 2; }
done
# flwr starts flower-superexec / flwr-serverapp / flwr-clientapp by name: same environment first.
export PATH="$VENV_BIN:$PATH"

NUM_NODES="${NUM_NODES:-2}"
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_NODES must be a positive integer, got '$NUM_NODES'" >&2; exit 2; }
INSECURE="${INSECURE:-0}"
PRESET="${PRESET:-default}"
RUN_CONFIG="${RUN_CONFIG:-num-clients=$NUM_NODES num-rounds=2 rollout-batch-size=2 max-new-tokens=8 ppo-epochs=1 num-minibatches=1}"
RUN_DIR="${RUN_DIR:-$REPO/runs/flower-deployment-$(date +%Y%m%d-%H%M%S)}"
TIMEOUT_S="${TIMEOUT_S:-1800}"
case "$INSECURE" in 0|1) ;; *) echo "error: INSECURE must be 0 or 1, got '$INSECURE'" >&2; exit 2 ;; esac
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$PWD/$RUN_DIR" ;; esac  # relative paths would resolve in the SuperLink's directory

# --- stop everything we started, by process id ----------------------------------------------
# Flower detaches its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) into their own
# sessions, so we collect each started process's descendants by parent id and stop them too.
STARTED_PIDS=()
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}
stop_all() {
    local pids=() pid
    for pid in ${STARTED_PIDS[@]+"${STARTED_PIDS[@]}"}; do
        pids+=("$pid" $(descendants "$pid"))
    done
    ((${#pids[@]})) || return 0
    echo "Stopping Flower processes: ${pids[*]}"
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 0.5
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
    echo "Logs: $WORK"
}
trap stop_all EXIT

# --- 0. check the settings and prepare the policy before starting anything --------------------
echo "FIRM preset '$PRESET', run config '$RUN_CONFIG'"
"$PY" - "$PRESET" "$RUN_CONFIG" "$NUM_NODES" <<'EOF'
import sys
from flwr.common.config import parse_config_args
from firm.config import ConfigError
from firm.federation.protocol import config_from_run_config, run_config_defaults
from firm.models import resolve_policy_path
from firm.rewards import RewardSpecError, parse_reward_spec

try:
    config = config_from_run_config({**run_config_defaults(), "preset": sys.argv[1], **parse_config_args([sys.argv[2]])})
except ConfigError as err:
    sys.exit(f"error: {err}")
try:
    for spec in config.reward_specs():
        parse_reward_spec(spec)
except RewardSpecError as err:
    sys.exit(f"error: {err}\n(offline alternative: PRESET=simple-rewards)")
num_nodes = int(sys.argv[3])
if config.num_clients != num_nodes:
    sys.exit(f"error: this demo starts {num_nodes} SuperNodes, so num_clients must be {num_nodes} "
             f"(got {config.num_clients}); "
             "with fewer nodes than num_clients the ServerApp waits for ever")
# the embedded policy is dequantized once into a cache; do it now rather than in two clients at once
print("policy:", resolve_policy_path(config.policy))
EOF

# --- 1. a private work directory (mktemp makes it mode 0700): the Flower home (federations in
# config.toml, installed FABs, SuperLink state) stays out of ~/.flwr; certificates, node keys and
# the logs of every process go here too.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/firm-flower-demo.XXXXXX")"
export FLWR_HOME="$WORK/flwr-home"
# Without this the SuperLink reinstalls the app's dependencies with uv into a fresh environment
# for every run (and pulls a multi-GB CUDA torch). The SuperNodes do not install unless asked.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
# The ServerApp writes run directories only under this root (the SuperLink host's choice).
export FIRM_RUN_ROOT="$(dirname "$RUN_DIR")"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SUPERLINK_PORT="${SUPERLINK_PORT:-$(free_port)}"  # Fleet, Control and Runtime APIs share this port

# --- 2. certificates and node keys, and the flags that use them -------------------------------
# pki/ca.crt, server.pem, server.key: a throw-away CA and the SuperLink's certificate for
# 127.0.0.1 and localhost, signed by it (the CA's private key is never written);
# pki/supernode-<i>.key / .pub: node i's authentication key pair (EC P-384, OpenSSH format).
PKI="$WORK/pki"
if [[ "$INSECURE" == 1 ]]; then
    cat >&2 <<'EOF'
==========================================================================================
 INSECURE=1: LOCAL-DEVELOPMENT MODE. No TLS and no SuperNode authentication: traffic is
 unencrypted and any process that reaches the port can join the federation and train on,
 or poison, the model. Everything stays on 127.0.0.1; never use this mode across a network.
==========================================================================================
EOF
    SUPERLINK_SECURITY=(--insecure)
    SUPERNODE_TLS=(--insecure)
    CONNECTION_SECURITY="insecure = true"
    HEALTH_URL="http://127.0.0.1:$SUPERLINK_PORT/health"
else
    echo "Making a throw-away CA, the SuperLink's TLS certificate and $NUM_NODES SuperNode key pairs in $PKI"
    "$PY" -m firm.federation.certificates "$PKI" --nodes "$NUM_NODES" --host 127.0.0.1 --host localhost >/dev/null
    SUPERLINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.pem"
                        --ssl-keyfile "$PKI/server.key" --enable-supernode-auth)
    SUPERNODE_TLS=(--root-certificates "$PKI/ca.crt")
    CONNECTION_SECURITY="root-certificates = \"$PKI/ca.crt\""
    HEALTH_URL="https://127.0.0.1:$SUPERLINK_PORT/health"
fi

# --- 3. the federation the flwr CLI talks to: a SuperLink connection in $FLWR_HOME/config.toml --
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "firm-local-deployment"

[superlink.firm-local-deployment]
address = "127.0.0.1:$SUPERLINK_PORT"
$CONNECTION_SECURITY
EOF

# --- 4. the SuperLink -------------------------------------------------------------------------
echo "Starting flower-superlink on 127.0.0.1:$SUPERLINK_PORT (log: $WORK/superlink.log)"
(cd "$WORK" && exec flower-superlink "${SUPERLINK_SECURITY[@]}" --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$SUPERLINK_PORT") > "$WORK/superlink.log" 2>&1 &
STARTED_PIDS+=($!)
"$PY" - "$HEALTH_URL" "$PKI/ca.crt" <<'EOF'
import ssl, sys, time, urllib.request
url, ca_certfile = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca_certfile) if url.startswith("https:") else None
for _ in range(120):
    try:
        if urllib.request.urlopen(url, timeout=1, context=context).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"error: the SuperLink did not answer on {url}")
EOF

# --- 5. register each SuperNode's public key: with --enable-supernode-auth the SuperLink lets in
# only nodes whose key was registered, and only when they sign their requests with that key --
if [[ "$INSECURE" == 0 ]]; then
    for ((i = 0; i < NUM_NODES; i++)); do
        flwr supernode register "$PKI/supernode-$i.pub" firm-local-deployment
    done
fi

# --- 6. NUM_NODES SuperNodes, each with its own partition of the prompts -----------------------
# (--port is the SuperNode's own local API for its ClientApp processes: one free port each.
#  allow-server-run-dir: these nodes share the server's host and keep their state in its run directory.
#  A node can also train on a private file instead: --node-config 'prompts="/path/prompts.jsonl"')
for ((i = 0; i < NUM_NODES; i++)); do
    node_port="$(free_port)"
    node_auth=()
    [[ "$INSECURE" == 1 ]] || node_auth=(--auth-supernode-private-key "$PKI/supernode-$i.key")
    echo "Starting flower-supernode $i (partition-id=$i, log: $WORK/supernode-$i.log)"
    (cd "$WORK" && exec flower-supernode "${SUPERNODE_TLS[@]}" ${node_auth[@]+"${node_auth[@]}"} \
        --superlink "127.0.0.1:$SUPERLINK_PORT" --host 127.0.0.1 --port "$node_port" \
        --node-config "partition-id=$i num-partitions=$NUM_NODES allow-server-run-dir=true") > "$WORK/supernode-$i.log" 2>&1 &
    STARTED_PIDS+=($!)
done

# --- 7. submit the app and follow its log: flwr builds a FAB from this directory (files in
# .gitignore, e.g. .venv and runs/, stay out), the run config overrides pyproject's
# [tool.flwr.app.config], and --stream prints the ServerApp's log until the run has finished.
# Run-config values are TOML, so the strings are double-quoted inside the argument.
cd "$REPO"
START=$(date +%s)
timeout "$TIMEOUT_S" flwr run . firm-local-deployment --stream \
    --run-config "preset=\"$PRESET\" run-dir=\"$RUN_DIR\" $RUN_CONFIG" ||
    { echo "error: flwr run failed or did not finish within ${TIMEOUT_S}s" >&2; exit 1; }

# --- 8. how did it end? `flwr ls` says pending / starting / running / finished:<result> --------
STATUS=$(flwr ls firm-local-deployment --format json |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "Run: $STATUS after $(($(date +%s) - START)) s"
[[ "$STATUS" == "finished:completed" ]] || exit 1
[[ "$INSECURE" == 1 ]] || flwr supernode list firm-local-deployment
ls "$RUN_DIR" "$RUN_DIR/adapters" "$RUN_DIR/plots"
echo "Done: metrics in $RUN_DIR/metrics.jsonl, plots in $RUN_DIR/plots; score the last adapter with"
echo "  $VENV_BIN/firm eval --adapter $(ls -d "$RUN_DIR"/adapters/round-* | tail -1)"
