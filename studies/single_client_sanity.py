"""One client, no federation: does PPO raise the held-out reward of the embedded policy at all?

    .venv/bin/python studies/single_client_sanity.py firm "" 1e-3 0.01 8     # algorithm, preference, lr, KL, rounds
"""
import random, sys, time, json, torch
from firm.config import FirmConfig
from firm.models import load_policy, add_lora, MultiObjectiveValueHead
from firm.rewards import build_rewards
from firm.prompts import load_prompts
from firm.partition import split_evaluation
from firm.sampling import generate
from firm.trainer import FirmLocalTrainer, score_responses
torch.set_num_threads(2)
algo, pref, lr, kl, rounds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
cfg = FirmConfig(algorithm=algo, preference=pref, learning_rate=lr, kl_coef=kl, rollout_batch_size=16,
                 ppo_epochs=4, num_minibatches=2, max_new_tokens=24, optimizer="adamw").validate()
policy, tok = load_policy("embedded")
torch.manual_seed(0)
policy = add_lora(policy, r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "v_proj"))
rewards = build_rewards(cfg.reward_specs(), device="cpu")
vh = MultiObjectiveValueHead(policy.get_base_model().config.hidden_size, len(rewards))
trainer = FirmLocalTrainer(policy, tok, vh, rewards, cfg)
train, held = split_evaluation(load_prompts("embedded"), 0.1)
held = held[:16]
def measure():
    torch.manual_seed(7)
    out = []
    for i in range(0, len(held), 16):
        g = generate(policy, tok, held[i:i+16] * 2, cfg)
        out.append(score_responses(rewards, held[i:i+16] * 2, g.responses))
    s = torch.cat(out)
    return [round(float(x), 4) for x in s.mean(0)], g.responses[0][:80]
rng = random.Random(0); t = time.time()
print("round 0", measure(), flush=True)
for r in range(1, rounds + 1):
    st = trainer.train_round(train, rng)
    print("round", r, measure(), f"{time.time()-t:.0f}s", flush=True)
