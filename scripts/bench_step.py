"""Time one FIRM step by phase on a fixed work unit, next to a fixed-weight single-backward step
(and, with --anchor trl, TRL's GRPOTrainer on the same work), and print the ratios.

The work unit: the embedded SmolLM2-135M-Instruct in float32 with a LoRA r16 adapter
on q_proj/v_proj, 16 prompts x up to 48 new tokens, the two embedded rewards (helpful,
harmless), one PPO pass over one minibatch: one optimiser step.

    python scripts/bench_step.py                          # firm and fixed-weight, 3 timed steps each
    python scripts/bench_step.py --anchor trl             # + TRL GRPO (pip install 'firm[bench]')
    python scripts/bench_step.py --variants               # + each generation / gradient trick alone
    python scripts/bench_step.py --steps 5 --json out.json
    python scripts/bench_step.py --modes firm,fixed,firm-last-hidden   # + the opt-in MGDA-UB Gram
    python scripts/bench_step.py --modes firm,fixed,firm-bf16,firm-last-hidden-bf16   # + bfloat16 sampling

Phases of a firm step: generate (sampling; in the current code it also yields the behaviour
log-probs and the critic's inputs), old log-probs + values forward (a separate no-grad forward
in older code, 0 here when absent), reference forward (adapter disabled), reward scoring,
advantages, update (forward + M per-objective backward passes + solver + optimiser step; the
fixed-weight step does one backward of sum_m p_m L_m instead). Medians over --steps timed steps
after one warm-up step; every mode starts from the same adapter and the same random seed.

The phases are timed from outside the trainer (wrapping the generate, policy_forward and
score_responses that firm.trainer calls), and functions are looked up where each version keeps
them (``firm_function``), so the same script times older versions of the package too: run it
with PYTHONPATH pointing at another checkout for a before/after table. The trainer's speed paths
(--no-merge, --batched-gradients) are constructor arguments; a version without them runs its
own defaults. Compare numbers only within
one run (ratios): this machine's speed varies from day to day and with its load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PHASES = ("generate", "old_logprobs", "reference", "rewards", "advantages", "update")
PHASE_LABELS = {
    "generate": "generate",
    "old_logprobs": "old log-probs + values forward",
    "reference": "reference forward",
    "rewards": "reward scoring",
    "advantages": "advantages (GAE)",
    "update": "update",
    "step": "step total",
}


def firm_function(name: str):
    """firm's function ``name`` from the module that holds it in this checkout (sampling and the
    gradient math moved out of firm.trainer; older versions keep them there), or None."""
    for module in ("firm.sampling", "firm.gradients", "firm.trainer"):
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module(module), name, None)
            if found is not None:
                return found
    return None


def speed_arguments(trainer_cls, switches: dict) -> dict:
    """The speed-path switches this version's trainer constructor takes."""
    accepted = inspect.signature(trainer_cls.__init__).parameters
    return {name: value for name, value in switches.items() if name in accepted}


# ---- peak memory ---------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing the trainer from outside -------------------------------------------------------------
class PhaseClock:
    """Wraps firm.trainer's module functions so every call is timed under its phase name."""

    def __init__(self, trainer_module, trainer, device: torch.device):
        self.times: dict[str, float] = defaultdict(float)
        self.generated_positions = 0  # B x T decoding positions of the last step
        self.generated_tokens = 0  # tokens up to and including EOS
        self.device = device
        self._reference = False
        module = trainer_module
        self._patches = [(module, "generate", module.generate), (module, "score_responses", module.score_responses),
                         (module, "policy_forward", module.policy_forward)]
        clock = self

        def timed_generate(*args, **kwargs):
            with clock.timing("generate"):
                gen = self._patches[0][2](*args, **kwargs)
            clock.generated_positions = gen.response_mask.numel()
            clock.generated_tokens = int(gen.response_mask.sum())
            return gen

        def timed_score(*args, **kwargs):
            with clock.timing("rewards"):
                return self._patches[1][2](*args, **kwargs)

        def timed_forward(*args, **kwargs):
            if torch.is_grad_enabled():  # the update's forward: timed as part of "update"
                return self._patches[2][2](*args, **kwargs)
            with clock.timing("reference" if clock._reference else "old_logprobs"):
                return self._patches[2][2](*args, **kwargs)

        module.generate, module.score_responses, module.policy_forward = timed_generate, timed_score, timed_forward
        disable_adapter = trainer.policy.disable_adapter

        @contextlib.contextmanager
        def flagged_disable_adapter():
            with disable_adapter():
                clock._reference = True
                try:
                    yield
                finally:
                    clock._reference = False

        trainer.policy.disable_adapter = flagged_disable_adapter

    @contextlib.contextmanager
    def timing(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.times[name] += time.perf_counter() - start

    def restore(self) -> None:
        for module, name, original in self._patches:
            setattr(module, name, original)


def fixed_weight_trainer_class(base):
    """The same trainer whose step does ONE backward of the fixed-weight loss sum_m p_m L_m."""
    from firm.ppo import clipped_surrogate_losses, clipped_value_loss

    policy_forward = firm_function("policy_forward")

    class FixedWeightTrainer(base):
        def firm_step(self, rollout, idx, advantages, returns, stats) -> None:
            cfg = self.config
            mask = rollout.response_mask[idx]
            self.policy.train()
            logprobs, hidden = policy_forward(self.policy, rollout.input_ids[idx], rollout.attention_mask[idx],
                                              rollout.response_length, cfg.temperature)
            losses, _ = clipped_surrogate_losses(logprobs, rollout.logprobs[idx], advantages[idx], mask,
                                                 cfg.clip_range)
            value_loss, _ = clipped_value_loss(self.value_head(hidden), rollout.values[idx], returns[idx], mask,
                                               cfg.clip_range_value)
            weights = torch.as_tensor(self.preference, dtype=losses.dtype, device=losses.device)
            (weights @ losses + cfg.value_coef * value_loss).backward()
            torch.nn.utils.clip_grad_norm_(self.lora_params, cfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(list(self.value_head.parameters()), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            stats.steps += 1

    return FixedWeightTrainer


# ---- the work unit -------------------------------------------------------------------------------
def work_unit_config(args):
    from firm.config import build_config

    overrides = {"rollout_batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "ppo_epochs": 1,
                 "num_minibatches": 1, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": "q_proj,v_proj",
                 "seed": args.seed, "device": args.device, "policy": args.policy}
    if args.rewards:
        overrides["rewards"] = args.rewards
    return build_config("default", overrides)


def load_work_unit(args, config):
    from firm.models import MultiObjectiveValueHead, add_lora, adapter_state, load_policy, resolve_device
    from firm.prompts import load_embedded_prompts
    from firm.rewards import build_rewards

    device = resolve_device(config.device)
    policy, tokenizer = load_policy(config.policy, dtype=config.dtype)
    policy.to(device)
    torch.manual_seed(args.seed)
    policy = add_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules())
    rewards = build_rewards(config.reward_specs(), device=str(device))
    prompts = load_embedded_prompts()
    start = adapter_state(policy)
    hidden = policy.get_base_model().config.hidden_size
    return device, policy, tokenizer, rewards, prompts, start, MultiObjectiveValueHead(hidden, len(rewards))


def prompt_batches(prompts, batch_size: int, count: int, seed: int):
    rng = random.Random(seed)
    return [rng.sample(prompts, batch_size) for _ in range(count)]


def run_mode(name, trainer_cls, args, config, unit, batches) -> dict:
    """Warm-up + timed steps of one trainer class; phase medians, peak memory, tokens/s."""
    import firm.trainer as trainer_module
    from firm.models import load_adapter_state
    from firm.trainer import RoundStats

    device, policy, tokenizer, rewards, _, start, head = unit
    load_adapter_state(policy, start)
    value_head = type(head)(head.linear.in_features, head.linear.out_features)
    trainer = trainer_cls(policy, tokenizer, value_head, rewards, config, **speed_arguments(trainer_cls, args.switches))
    clock = PhaseClock(trainer_module, trainer, device)
    rng = random.Random(args.seed)
    steps = []
    try:
        for index, batch in enumerate(batches):
            torch.manual_seed(args.seed + index)
            clock.times.clear()
            reset_peak_memory(device)
            stats = RoundStats()
            synchronize(device)
            t0 = time.perf_counter()
            rollout = trainer.rollout(batch)
            with clock.timing("advantages"):
                advantages, returns, _ = trainer.advantages(rollout)
            with clock.timing("update"):
                trainer.ppo_epochs(rollout, advantages, returns, stats, rng.randrange(2**31))
            synchronize(device)
            step = dict(clock.times)
            step["step"] = time.perf_counter() - t0
            step["peak_mb"] = peak_memory_mb(device)
            step["positions"] = clock.generated_positions
            step["tokens"] = clock.generated_tokens
            step["skipped"] = stats.skipped_steps
            steps.append(step)
            print(f"  {name} step {index}{' (warm-up)' if index == 0 else ''}: {step['step']:.2f} s "
                  f"(generate {step.get('generate', 0):.2f}, update {step['update']:.2f})", flush=True)
    finally:
        clock.restore()
        if hasattr(trainer.policy, "disable_adapter") and "disable_adapter" in vars(trainer.policy):
            del trainer.policy.disable_adapter
    timed = steps[1:] or steps
    result = {key: statistics.median(s.get(key, 0.0) for s in timed) for key in (*PHASES, "step")}
    result["peak_mb"] = max(s["peak_mb"] for s in timed)
    result["tokens_per_s"] = statistics.median(s["positions"] / s["generate"] for s in timed)
    result["positions"] = statistics.median(s["positions"] for s in timed)
    result["tokens"] = statistics.median(s["tokens"] for s in timed)
    result["skipped"] = sum(s["skipped"] for s in timed)
    return result


# ---- TRL's GRPO on the same work -------------------------------------------------------------------
def run_trl(args, config, unit, count: int) -> dict:
    """GRPOTrainer on the same model, LoRA, rewards, batch (16 completions = 4 prompts x 4
    generations), lengths, temperature and learning rate; fp32, no gradient checkpointing, one
    PPO pass (num_iterations=1), beta = firm's kl_coef so it also runs a reference forward."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from firm.models import load_policy

    device, _, _, rewards, prompts, _, _ = unit
    policy, tokenizer = load_policy(config.policy, dtype=config.dtype)
    generations = 4
    per_step = args.batch_size // generations
    chosen = random.Random(args.seed + 1).sample(prompts, per_step * count)
    dataset = Dataset.from_list([{"prompt": p.chat_messages(), "firm_index": i} for i, p in enumerate(chosen)])
    reward_seconds = []

    def reward_func(reward):
        def score(prompts, completions, firm_index, **_):
            start = time.perf_counter()
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            values = reward.score([chosen[i] for i in firm_index], texts).tolist()
            reward_seconds.append(time.perf_counter() - start)
            return values

        score.__name__ = reward.name
        return score

    step_times, generate_times = [], []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            synchronize(device)
            self.start = time.perf_counter()
            reward_seconds.clear()
            reset_peak_memory(device)

        def on_step_end(self, *a, **k):
            synchronize(device)
            step_times.append((time.perf_counter() - self.start, sum(reward_seconds), peak_memory_mb(device)))

    grpo = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.batch_size,
        num_generations=generations, gradient_accumulation_steps=1, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=0, beta=config.kl_coef, num_iterations=1,
        learning_rate=config.learning_rate, max_steps=count, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=device.type == "cpu", seed=args.seed,
        remove_unused_columns=False, disable_dropout=True, dataloader_num_workers=0, shuffle_dataset=False,
        max_grad_norm=config.max_grad_norm,
    )
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules()), bias="none", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_func(r) for r in rewards], args=grpo,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                          callbacks=[StepClock()])
    model = trainer.model
    original_generate = model.generate

    def timed_generate(*a, **k):
        synchronize(device)
        start = time.perf_counter()
        out = original_generate(*a, **k)
        synchronize(device)
        generate_times.append((time.perf_counter() - start, out.shape[0] * (out.shape[1] - k["input_ids"].shape[1])))
        return out

    model.generate = timed_generate
    torch.manual_seed(args.seed)
    trainer.train()
    for index, (seconds, _, _) in enumerate(step_times):
        print(f"  trl step {index}{' (warm-up)' if index == 0 else ''}: {seconds:.2f} s", flush=True)
    timed = list(range(1, len(step_times))) or [0]
    result = {
        "step": statistics.median(step_times[i][0] for i in timed),
        "rewards": statistics.median(step_times[i][1] for i in timed),
        "peak_mb": max(step_times[i][2] for i in timed),
    }
    if len(generate_times) == len(step_times):
        result["generate"] = statistics.median(generate_times[i][0] for i in timed)
        result["tokens_per_s"] = statistics.median(generate_times[i][1] / generate_times[i][0] for i in timed)
    return result


# ---- single tricks, measured alone -----------------------------------------------------------------
def run_variants(args, config, unit, repeats: int) -> dict:
    """Each generation and gradient trick alone, interleaved so load changes hit every variant alike."""
    import firm.models as models_module
    from firm.models import merged_lora
    from firm.ppo import clipped_surrogate_losses

    device, policy, tokenizer, rewards, prompts, start, _ = unit
    batch = prompt_batches(prompts, args.batch_size, 1, args.seed + 7)[0]
    texts = [tokenizer.apply_chat_template(p.chat_messages(), tokenize=False, add_generation_prompt=True) for p in batch]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=config.max_prompt_tokens,
                    add_special_tokens=False).to(device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sample, generate = firm_function("sample"), firm_function("generate")
    objective_gradients, policy_forward = firm_function("objective_gradients"), firm_function("policy_forward")
    with torch.no_grad():  # a non-zero adapter, so merging has something to merge
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)

    def hf(**extra):
        def run():
            policy.eval()
            with torch.no_grad():
                out = policy.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                                      temperature=config.temperature, top_p=config.top_p, top_k=0,
                                      max_new_tokens=config.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                      use_cache=True, **extra)
            return out.shape[0] * (out.shape[1] - enc.input_ids.shape[1])
        return run

    def loop(merge: bool, halves: bool = False):
        def run():
            policy.eval()
            rows = [torch.arange(len(batch))]
            if halves:  # two sub-batches of similar prompt length
                order = enc.attention_mask.sum(-1).argsort()
                rows = [order[: len(order) // 2], order[len(order) // 2 :]]
            positions = 0
            with merged_lora(policy) if merge else contextlib.nullcontext():
                for r in rows:
                    ids, am = enc.input_ids[r], enc.attention_mask[r]
                    keep = am.sum(0) > 0  # drop columns that are padding in every row
                    ids, am = ids[:, keep], am[:, keep]
                    tokens, _, _ = sample(policy, ids, am, config.max_new_tokens, config.temperature, config.top_p,
                                          eos, pad)
                    positions += tokens.numel()
            return positions
        return run

    def bfloat16_loop():
        """The same loop on the opt-in sampler's bfloat16 copy of the merged model (sampling_dtype =
        bfloat16): fewer bytes per weight read, and different numbers."""
        low = models_module.BFloat16Sampler(policy).refresh()

        def run():
            tokens, _, _ = sample(low, enc.input_ids, enc.attention_mask, config.max_new_tokens,
                                  config.temperature, config.top_p, eos, pad)
            return tokens.numel()
        return run

    variants = {"hf generate, dynamic cache (before)": hf(),
                "hf generate, static cache": hf(cache_implementation="static")}
    if sample is not None:
        variants.update({"firm sample loop, LoRA unmerged": loop(False),
                         "firm sample loop, LoRA merged (default)": loop(True),
                         "firm sample loop, merged, 2 length-sorted halves": loop(True, halves=True)})
    if hasattr(models_module, "BFloat16Sampler"):  # checkouts with the opt-in bfloat16 sampler
        variants["firm sample loop, bfloat16 copy (changes the numbers)"] = bfloat16_loop()
    seconds: dict[str, list[float]] = defaultdict(list)
    rates: dict[str, list[float]] = defaultdict(list)
    for repeat in range(repeats + 1):
        for name, run in variants.items():
            torch.manual_seed(args.seed + repeat)
            synchronize(device)
            t0 = time.perf_counter()
            positions = run()
            synchronize(device)
            if repeat:  # the first round is warm-up
                seconds[name].append(time.perf_counter() - t0)
                rates[name].append(positions / seconds[name][-1])
    result = {name: {"seconds": statistics.median(seconds[name]), "tokens_per_s": statistics.median(rates[name]),
                     "all_seconds": [round(x, 2) for x in seconds[name]]} for name in variants}

    if objective_gradients is not None:  # per-objective gradients: M passes vs one vmapped pass
        gen = generate(policy, tokenizer, batch, config)
        params = [p for n, p in policy.named_parameters() if p.requires_grad]
        T = gen.response_mask.shape[1]
        advantages = torch.randn(*gen.response_mask.shape, len(rewards), device=device)
        timings: dict[str, list[float]] = defaultdict(list)
        grads = {}
        for repeat in range(repeats + 1):
            for batched in (False, True):
                policy.train()
                synchronize(device)
                t0 = time.perf_counter()
                logprobs, _ = policy_forward(policy, gen.input_ids, gen.attention_mask, T, config.temperature)
                losses, _ = clipped_surrogate_losses(logprobs, gen.logprobs.detach(), advantages, gen.response_mask,
                                                     config.clip_range)
                try:
                    grads[batched] = objective_gradients(losses, params, batched=batched)
                except RuntimeError as error:  # a backward op without a batching rule
                    result[f"objective gradients batched={batched}"] = {"error": str(error).splitlines()[0]}
                    break
                synchronize(device)
                if repeat:
                    timings[f"forward + M backward, batched={batched}"].append(time.perf_counter() - t0)
        for name, values in timings.items():
            result[name] = {"seconds": statistics.median(values), "all_seconds": [round(x, 2) for x in values]}
        if len(grads) == 2:
            result["batched gradients max abs difference"] = float((grads[True] - grads[False]).abs().max())
    from firm.models import load_adapter_state

    load_adapter_state(policy, start)
    return result


# ---- report ----------------------------------------------------------------------------------------
def print_table(results: dict, trl: dict | None) -> None:
    modes = list(results)
    header = "| phase (median, s) | " + " | ".join(modes) + (" | TRL GRPO |" if trl else " |")
    print("\n" + header)
    print("|" + " --- |" * (len(modes) + 1 + (1 if trl else 0)))
    for key in (*PHASES, "step"):
        cells = [f"{results[m][key]:.2f}" for m in modes]
        if trl:
            cells.append(f"{trl[key]:.2f}" if key in trl else "")
        label = f"**{PHASE_LABELS[key]}**" if key == "step" else PHASE_LABELS[key]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{results[m]['peak_mb']:.0f}" for m in modes] + ([f"{trl['peak_mb']:.0f}"] if trl else [])
    print("| peak memory (MB) | " + " | ".join(cells) + " |")
    cells = [f"{results[m]['tokens_per_s']:.1f}" for m in modes] + (
        [f"{trl['tokens_per_s']:.1f}" if "tokens_per_s" in trl else ""] if trl else [])
    print("| generation tokens/s (B x T positions) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rewards", default=None, help="reward specs (default: embedded:helpful,embedded:harmless)")
    parser.add_argument("--policy", default="embedded", help="policy (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="firm,fixed",
                        help="comma-separated: firm, fixed, firm-last-hidden (the opt-in approximate Gram), "
                             "firm-bf16 (opt-in bfloat16 sampling), firm-last-hidden-bf16 (both); the opt-in "
                             "modes need a checkout that has them ('' for none)")
    parser.add_argument("--anchor", choices=("none", "trl"), default="none")
    parser.add_argument("--variants", action="store_true", help="also time each generation/gradient trick alone")
    parser.add_argument("--no-merge", action="store_true", help="sample with the LoRA unmerged")
    parser.add_argument("--batched-gradients", action="store_true", help="one vmapped backward for the M gradients")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.switches = {"merge_lora_for_sampling": not args.no_merge,
                     "batched_objective_gradients": args.batched_gradients}

    import firm
    from firm.trainer import FirmLocalTrainer

    config = work_unit_config(args)
    unit = load_work_unit(args, config)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"firm from {Path(firm.__file__).parent}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {unit[0]}; load average {load:.2f}")
    print(f"work unit: {args.batch_size} prompts x up to {args.max_new_tokens} new tokens, rewards "
          f"{config.rewards}, LoRA r{config.lora_r} on {config.lora_target_modules}, one optimiser step")
    batches = prompt_batches(unit[4], args.batch_size, args.steps + 1, args.seed)
    # mode: (trainer class, settings changed from the work unit's); firm-last-hidden is the opt-in
    # approximate Gram (MGDA-UB), one full backward per step; the -bf16 modes sample from a
    # bfloat16 copy of the merged policy (opt-in sampling_dtype = bfloat16)
    modes = {"firm": (FirmLocalTrainer, {}), "fixed": (fixed_weight_trainer_class(FirmLocalTrainer), {}),
             "firm-last-hidden": (FirmLocalTrainer, {"gram": "last-hidden"}),
             "firm-bf16": (FirmLocalTrainer, {"sampling_dtype": "bfloat16"}),
             "firm-last-hidden-bf16": (FirmLocalTrainer, {"gram": "last-hidden", "sampling_dtype": "bfloat16"})}
    results = {}
    for mode in filter(None, args.modes.split(",")):
        trainer_cls, changes = modes[mode]
        results[mode] = run_mode(mode, trainer_cls, args, dataclasses.replace(config, **changes), unit, batches)
    trl = run_trl(args, config, unit, args.steps + 1) if args.anchor == "trl" else None
    variants = run_variants(args, config, unit, max(1, args.steps)) if args.variants else None
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    if results or trl:
        print_table(results, trl)
    ratios = {}
    for mode in (m for m in results if m != "fixed"):
        if "fixed" in results:
            ratios[f"{mode} update / fixed-weight single-backward update"] = (
                results[mode]["update"] / results["fixed"]["update"])
            if mode == "firm":
                ratios["firm step / fixed-weight step"] = results["firm"]["step"] / results["fixed"]["step"]
        if trl:
            ratios[f"{mode} step / TRL GRPO step"] = results[mode]["step"] / trl["step"]
            if "generate" in trl:
                ratios[f"{mode} generate / TRL generate"] = results[mode]["generate"] / trl["generate"]
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for mode in results:
        print(f"{mode} generation: {results[mode]['tokens_per_s']:.1f} tokens/s "
              f"({results[mode]['positions']:.0f} positions, {results[mode]['tokens']:.0f} up to EOS)")
    if variants:
        print("\nsingle tricks (median of interleaved repeats, same batch):")
        for name, value in variants.items():
            print(f"  {name}: {value}")
    print(f"load average: {load:.2f} at start, {load_end:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "trl": trl, "ratios": ratios,
                                               "variants": variants, "load": [load, load_end],
                                               "threads": torch.get_num_threads(), "args": {
                                                   k: v for k, v in vars(args).items() if k != "switches"}},
                                              indent=2))


if __name__ == "__main__":
    main()
