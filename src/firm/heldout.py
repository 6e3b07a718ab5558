"""Did training help? The held-out reward of an adapter against the untrained policy.

Both are scored by `firm eval` (firm.evaluate) on the same held-out prompts with the same
sampling seed, so the two evaluations line up response by response: pair i is prompt
``i // samples_per_prompt``'s sample ``i % samples_per_prompt`` under each policy. The gain per
objective is the mean of the paired differences (adapter minus base); its interval is a
percentile bootstrap that resamples *prompts* (each with all its samples), because samples of
one prompt are not independent of each other.

`firm train` ends with this comparison (`heldout_before_after`), `firm compare` reports every
run's gain over one base evaluation per experiment, and studies/learning_curve.py uses it
round by round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from firm.config import ConfigError
from firm.rundir import atomic_write_text
from firm.stats import bootstrap_interval

HELDOUT_FILE = "heldout.json"
"""What `firm train` writes into the run directory: the base and final evaluations and the gains."""


def prompt_means(values: Sequence[float], prompt_index: Sequence[int]) -> np.ndarray:
    """Mean of ``values`` per prompt (prompts in order of first appearance)."""
    v, idx = np.asarray(values, dtype=np.float64), np.asarray(prompt_index)
    order = list(dict.fromkeys(idx.tolist()))
    return np.array([v[idx == p].mean() for p in order])


def check_paired(base: dict[str, Any], tuned: dict[str, Any]) -> None:
    """Refuse two evaluations that are not of the same prompts, samples and sampling settings."""
    for result, what in ((base, "base"), (tuned, "adapter")):
        if "per_response" not in result or "pairing" not in result:
            raise ConfigError(f"the {what} evaluation has no per-response scores (re-run it with this version "
                              "of firm eval)")
    a, b = base["pairing"], tuned["pairing"]
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differing:
        raise ConfigError("the two evaluations are not paired: they differ in " + ", ".join(
            f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in differing))
    if base["per_response"]["prompt_index"] != tuned["per_response"]["prompt_index"]:
        raise ConfigError("the two evaluations are not paired: their prompts are in a different order")


def paired_gain(base: dict[str, Any], tuned: dict[str, Any], level: float = 0.95, resamples: int = 10_000,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """Per objective: base and adapter means, the mean paired gain and its prompt-level bootstrap
    interval, the number of pairs and of prompts; plus the same for the KL to the base."""
    check_paired(base, tuned)
    index = base["per_response"]["prompt_index"]
    base_scores = np.asarray(base["per_response"]["rewards"], dtype=np.float64)
    tuned_scores = np.asarray(tuned["per_response"]["rewards"], dtype=np.float64)
    names = list(base["rewards"])
    gains: dict[str, dict[str, float]] = {}
    for m, name in enumerate(names):
        per_prompt = prompt_means(tuned_scores[:, m] - base_scores[:, m], index)
        low, high = bootstrap_interval(per_prompt, level=level, resamples=resamples, seed=seed)
        gains[name] = {"base": float(base_scores[:, m].mean()), "adapter": float(tuned_scores[:, m].mean()),
                       "gain": float(per_prompt.mean()), "ci_low": low, "ci_high": high,
                       "pairs": int(len(index)), "prompts": int(per_prompt.size)}
    return gains


def pooled_gain(base: dict[str, Any], evaluations: Sequence[dict[str, Any]], level: float = 0.95,
                resamples: int = 10_000, seed: int = 0) -> dict[str, dict[str, float]]:
    """One algorithm's gain over the untrained policy across its seeds: per prompt, the paired
    gain averaged over samples and seeds; the interval resamples prompts. Every evaluation must be
    paired with ``base`` (same prompts, samples and seed)."""
    for evaluation in evaluations:
        check_paired(base, evaluation)
    index = base["per_response"]["prompt_index"]
    base_scores = np.asarray(base["per_response"]["rewards"], dtype=np.float64)
    gains = {}
    for m, name in enumerate(base["rewards"]):
        per_prompt = np.mean([prompt_means(np.asarray(e["per_response"]["rewards"], dtype=np.float64)[:, m]
                                           - base_scores[:, m], index) for e in evaluations], axis=0)
        low, high = bootstrap_interval(per_prompt, level=level, resamples=resamples, seed=seed)
        gains[name] = {"gain": float(per_prompt.mean()), "ci_low": low, "ci_high": high,
                       "prompts": int(per_prompt.size), "seeds": len(evaluations)}
    return gains


def gain_excludes_zero(gain: dict[str, float]) -> bool:
    return gain["ci_low"] > 0 or gain["ci_high"] < 0


def format_gains(gains: dict[str, dict[str, float]]) -> str:
    """One line: 'helpful 0.122 -> 0.180 (+0.058 [+0.021, +0.094]); harmless ...'."""
    return "; ".join(f"{name} {g['base']:.3f} -> {g['adapter']:.3f} ({g['gain']:+.3f} [{g['ci_low']:+.3f}, "
                     f"{g['ci_high']:+.3f}])" for name, g in gains.items())


def heldout_before_after(run_path: Path, adapter: Path, num_prompts: int, samples_per_prompt: int,
                         device: str | None = None) -> dict[str, Any]:
    """Score the untrained policy and ``adapter`` on the run's held-out prompts (its own prompt
    set, split, rewards and sampling; firm.evaluate.eval_config_for), pair them, write
    RUN_DIR/heldout.json and return what was written."""
    from firm.evaluate import eval_config_for, evaluate  # loads torch and the models: only when used

    settings = {"num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt, "show_samples": 2}
    if device is not None:
        settings["device"] = device
    tuned_cfg = eval_config_for({"adapter": str(adapter), **settings})
    base_cfg = eval_config_for({**settings, **{k: getattr(tuned_cfg, k) for k in
                                               ("policy", "prompts", "eval_fraction", "rewards", "max_new_tokens",
                                                "temperature")}})
    if base_cfg.policy is None:  # the adapter's base, as evaluate() would infer it
        from firm.evaluate import infer_policy
        base_cfg.policy = infer_policy(str(adapter))
    base = evaluate(base_cfg)
    tuned = evaluate(tuned_cfg)
    record = {"adapter": str(adapter), "num_prompts": base["num_prompts"], "samples_per_prompt": samples_per_prompt,
              "gains": paired_gain(base, tuned), "kl": tuned["kl"], "base": base, "final": tuned}
    atomic_write_text(Path(run_path) / HELDOUT_FILE, json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["HELDOUT_FILE", "check_paired", "format_gains", "gain_excludes_zero", "heldout_before_after",
           "paired_gain", "pooled_gain", "prompt_means"]
