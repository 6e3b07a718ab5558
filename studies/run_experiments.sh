#!/usr/bin/env bash
# The experiments behind EXPERIMENTS.md, at the size stated there. Each command resumes: a run
# whose directory already holds all its rounds is reused, so this can be re-run after an
# interruption. Outputs go to experiments/ (tables, results.json, plots; runs/ is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
FIRM=${FIRM:-.venv/bin/firm}
SEEDS=${SEEDS:-0,1,2}
# Sized for a 2-core CPU: 2 clients x 3 rounds, 4 prompts x 24 tokens per rollout, 1 PPO epoch.
SIZE=(--num-clients 2 --num-rounds 3 --rollout-batch-size 4 --num-minibatches 1 --ppo-epochs 1
      --max-new-tokens 24)

# Claims 1-4: all four algorithms on identical data, partitions and seeds.
"$FIRM" compare --out experiments/compare --algorithms firm,mgda,linear,fsmgda \
  --partitions iid,dirichlet --seeds "$SEEDS" --eval-prompts 16 -- "${SIZE[@]}"

# Claim 5: the preference knob, for firm at the paper's beta and at beta = 1, and for linear.
"$FIRM" pareto --out experiments/pareto --algorithms firm,linear --betas 0.01,1 \
  --seeds "$SEEDS" --eval-prompts 16 -- "${SIZE[@]}"

# Where the algorithms can differ at all: the gradient geometry per client type (no training, ~3 min).
.venv/bin/python studies/gradient_geometry.py --batches 4 --batch-size 8 --out experiments/gradient_geometry

# The decisive run: 4 clients on the category partition (each holds one prompt group),
# 8 local steps per round (4 minibatches x 2 epochs), AdamW kept across rounds, KL outside the
# objectives, 6 rounds, firm at beta 0.01 and 1 against mgda, linear and fsmgda on paired seeds;
# final rewards on the 36 held-out prompts x 2 samples. About 7-10 min per run on an idle 2-core CPU.
"$FIRM" compare --out experiments/decisive --algorithms firm,mgda,linear,fsmgda --betas 0.01,1 \
  --partitions category --seeds "$SEEDS" --eval-prompts 36 --eval-samples 2 -- \
  --num-clients 4 --num-rounds 6 --rollout-batch-size 8 --num-minibatches 4 --ppo-epochs 2 --max-new-tokens 16 \
  --optimizer adamw --kl-in-objectives false
