"""`firm eval`: score a peft adapter (or the base model) on a prompt set.

Reports the mean reward per objective over sampled responses, the KL of the adapted policy to
the base (the sum over response tokens of log pi(y) - log pi_base(y), averaged over responses:
an unbiased Monte Carlo estimate of KL(pi || pi_base)), and a few sample responses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from firm.config import FirmConfig
from firm.models import load_policy, resolve_device
from firm.prompts import load_prompts
from firm.rewards import build_rewards
from firm.trainer import generate, policy_forward, score_responses


def infer_policy(adapter: str | None) -> str:
    """The base model an adapter was trained on: its run's config, else its adapter_config."""
    if adapter is None:
        return "embedded"
    adapter_dir = Path(adapter)
    run_config = adapter_dir.parent.parent / "config.json"
    if run_config.is_file():
        return FirmConfig.load(run_config).policy
    adapter_config = adapter_dir / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if base:
            return base
    return "embedded"


def evaluate(*, adapter: str | None, policy: str | None, prompts: str, rewards: str, num_prompts: int,
             max_new_tokens: int, temperature: float, batch_size: int, seed: int, num_samples: int,
             device: str = "auto") -> dict:
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter directory (adapter_config.json missing)")
    if num_prompts < 1 or batch_size < 1:
        raise ValueError("--num-prompts and --batch-size must be >= 1")
    policy = policy or infer_policy(adapter)
    cfg = FirmConfig(policy=policy, prompts=prompts, rewards=rewards, max_new_tokens=max_new_tokens,
                     temperature=temperature, device=device).validate()
    torch_device = resolve_device(cfg.device)
    prompt_set = load_prompts(prompts)
    prompt_set = load_prompts(prompts, limit=min(num_prompts, len(prompt_set)), seed=seed)
    reward_models = build_rewards(cfg.reward_specs(), device=str(torch_device))
    model, tokenizer = load_policy(policy, cfg.dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(torch_device).eval()
    torch.manual_seed(seed)
    scores, kls, lengths, samples = [], [], [], []
    for start in range(0, len(prompt_set), batch_size):
        batch = prompt_set[start : start + batch_size]
        gen = generate(model, tokenizer, batch, cfg)
        T = gen.response_mask.shape[1]
        if adapter is not None:
            with torch.no_grad():
                logprobs, _ = policy_forward(model, gen.input_ids, gen.attention_mask, T, cfg.temperature)
                with model.disable_adapter():
                    ref, _ = policy_forward(model, gen.input_ids, gen.attention_mask, T, cfg.temperature)
            kls.append(((logprobs - ref) * gen.response_mask).sum(-1).cpu())
        else:
            kls.append(torch.zeros(len(batch)))
        batch_scores = score_responses(reward_models, batch, gen.responses)
        scores.append(batch_scores)
        lengths.append(gen.response_mask.sum(-1).cpu())
        for p, r, s in zip(batch, gen.responses, batch_scores):
            if len(samples) < num_samples:
                samples.append({"prompt": p.text, "response": r,
                                "rewards": {m.name: float(v) for m, v in zip(reward_models, s)}})
    all_scores = torch.cat(scores).double()
    return {
        "model": f"{policy} + {adapter}" if adapter else f"{policy} (base)",
        "num_prompts": len(prompt_set),
        "rewards": {m.name: float(all_scores[:, i].mean()) for i, m in enumerate(reward_models)},
        "reward_std": {m.name: float(all_scores[:, i].std()) for i, m in enumerate(reward_models)},
        "kl": float(torch.cat(kls).double().mean()),
        "response_tokens": float(torch.cat(lengths).double().mean()),
        "samples": samples,
    }
