"""Does training help at all? Held-out learning curves of `firm train` settings on this machine.

For each named setting (a set of `firm train` flags) the study trains one run, then scores the
untrained policy and the adapters of chosen rounds on the same held-out prompts, samples and
seed (`firm eval`), and reports each round's paired gain over the untrained policy with a
prompt-level 95% interval (firm.heldout). A setting *learns* when both objectives' final gains
have intervals above 0. Reward hacking check: the share of the final adapter's sampled replies
that repeat a word at least three times in a row or use one word for over a quarter of their
words, against the untrained policy's (the helpful reward is a bag of n-grams, so stuffing
rewarded words is the cheap way up).

    .venv/bin/python studies/learning_curve.py --out experiments/learning_curve --settings lr1e-3 \
        --eval-prompts 30 --eval-samples 4 --every 2

Runs that finished are reused (a run directory with all rounds), so the study resumes; a setting
given more rounds than its run has continues that run (`firm train --resume --num-rounds`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from firm.heldout import format_gains, paired_gain
from firm.rundir import RunDir

# The candidate settings (flags on top of the embedded defaults). Each name says what it changes.
SETTINGS: dict[str, list[str]] = {
    # the default run, for reference: 4 clients x 3 rounds, 8 prompts x 32 tokens, 4 steps a round, lr 3e-4
    "default": [],
    # the `learning` preset: 2 clients x 12 rounds, 16 prompts x 24 tokens per batch, 4 PPO epochs x
    # 2 minibatches (8 steps a round), lr 1e-3, AdamW kept across rounds, KL 0.01
    "lr1e-3": ["--preset", "learning"],
    # the same at lr 3e-4 for 6 rounds
    "lr3e-4": ["--preset", "learning", "--num-rounds", "6", "--learning-rate", "3e-4"],
}


def run_logged(command: list[str], log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"=== {' '.join(command)}\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def eval_adapter(run: RunDir, round_number: int | None, prompts: int, samples: int, out: Path) -> dict:
    """`firm eval` of one round's adapter (None: the untrained policy) with the run's settings."""
    if out.exists():
        return json.loads(out.read_text())
    config = run.config()
    command = [sys.executable, "-m", "firm.cli", "eval", "--policy", config.policy, "--prompts", config.prompts,
               "--rewards", config.rewards, "--eval-fraction", repr(config.eval_fraction),
               "--num-prompts", str(prompts), "--samples-per-prompt", str(samples),
               "--max-new-tokens", str(config.max_new_tokens), "--temperature", repr(config.temperature),
               "--show-samples", str(prompts * samples), "--json", str(out)]
    if round_number is not None:
        command[4:4] = ["--adapter", str(run.adapter_dir(round_number))]
    if run_logged(command, run.path / "study-eval.log") != 0:
        raise SystemExit(f"firm eval failed; see {run.path / 'study-eval.log'}")
    return json.loads(out.read_text())


def repetition_share(responses: list[str]) -> float:
    """Share of replies with a word repeated 3 times in a row, or one word over 25 % of the words
    (a reply of at least 8 words)."""
    def stuffed(text: str) -> bool:
        words = re.findall(r"[a-z']+", text.lower())
        if re.search(r"\b(\w+)(\W+\1\b){2,}", text.lower()):
            return True
        return len(words) >= 8 and Counter(words).most_common(1)[0][1] > 0.25 * len(words)
    return float(np.mean([stuffed(r) for r in responses])) if responses else 0.0


def top_words(responses: list[str], k: int = 8) -> list[tuple[str, int]]:
    return Counter(w for r in responses for w in re.findall(r"[a-z']+", r.lower()) if len(w) > 3).most_common(k)


def study_setting(name: str, flags: list[str], root: Path, prompts: int, samples: int, every: int) -> dict:
    run_path = root / name
    log = root / f"{name}.log"
    state = run_path / "state.json"
    wall_file = run_path / "train_seconds.txt"  # wall time of the training, written once it finished
    # a resumed run is given the setting's rounds, which may be more than it was started with
    rounds = flags[flags.index("--num-rounds"):][:2] if "--num-rounds" in flags else []
    wanted = int(rounds[1]) if rounds else None
    if not state.exists() or (RunDir.open(run_path).completed_rounds
                              < (wanted or RunDir.open(run_path).config().num_rounds)):
        start = time.perf_counter()
        command = [sys.executable, "-m", "firm.cli", "train"]  # the study scores adapters itself: no held-out pass
        command += (["--resume", str(run_path), *rounds] if state.exists()
                    else ["--run-dir", str(run_path), "--heldout-prompts", "0", *flags])
        if run_logged(command, log) != 0:
            raise SystemExit(f"setting {name}: firm train failed; see {log}")
        previous = float(wall_file.read_text()) if wall_file.exists() else 0.0
        wall_file.write_text(f"{previous + time.perf_counter() - start:.1f}\n")
    train_seconds = float(wall_file.read_text()) if wall_file.exists() else float("nan")
    run = RunDir.open(run_path)
    config = run.config()
    base = eval_adapter(run, None, prompts, samples, run_path / f"eval-base-{prompts}x{samples}.json")
    rounds = sorted({*range(every, config.num_rounds + 1, every), config.num_rounds})
    curve = []
    for k in rounds:
        tuned = eval_adapter(run, k, prompts, samples, run_path / f"eval-round-{k:03d}-{prompts}x{samples}.json")
        curve.append({"round": k, "gains": paired_gain(base, tuned), "kl": tuned["kl"],
                      "response_tokens": tuned["response_tokens"]})
    final = eval_adapter(run, config.num_rounds, prompts, samples,
                         run_path / f"eval-round-{config.num_rounds:03d}-{prompts}x{samples}.json")
    base_replies = [s["response"] for s in base["samples"]]
    final_replies = [s["response"] for s in final["samples"]]
    record = {"setting": name, "flags": flags, "train_seconds": train_seconds, "curve": curve,
              "learns": all(g["ci_low"] > 0 for g in curve[-1]["gains"].values()),
              "repetition_share": {"base": repetition_share(base_replies), "final": repetition_share(final_replies)},
              "top_words": {"base": top_words(base_replies), "final": top_words(final_replies)},
              "final_samples": final["samples"][:4]}
    (run_path / "study.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def write_report(records: list[dict], out: Path, prompts: int, samples: int) -> None:
    lines = [f"# Learning curves on held-out prompts ({prompts} prompts x {samples} samples, paired with the "
             "untrained policy)", "",
             "| setting | round | " + " | ".join(f"gain {n} [95% CI]" for n in records[0]["curve"][0]["gains"])
             + " | KL | tokens | train wall s |", "| --- " * (4 + len(records[0]["curve"][0]["gains"])) + "|"]
    for r in records:
        for point in r["curve"]:
            cells = [f"{g['gain']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]" for g in point["gains"].values()]
            wall = f"{r['train_seconds']:.0f}" if point is r["curve"][-1] else ""
            lines.append(f"| {r['setting']} | {point['round']} | " + " | ".join(cells)
                         + f" | {point['kl']:.3f} | {point['response_tokens']:.1f} | {wall} |")
    lines += ["", "Learns (both final intervals above 0): "
              + ", ".join(f"{r['setting']}: {'yes' if r['learns'] else 'no'}" for r in records), "",
              "Reward hacking check (share of sampled replies that stuff one word): "
              + "; ".join(f"{r['setting']} {r['repetition_share']['base']:.2f} -> {r['repetition_share']['final']:.2f}"
                          for r in records), ""]
    for r in records:
        lines.append(f"- {r['setting']}: final {format_gains(r['curve'][-1]['gains'])}; most used words "
                     f"{r['top_words']['final']}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(records, out / "learning_curve.png")
    print("\n".join(lines))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records[0]["curve"][0]["gains"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
    for ax, name in zip(np.atleast_1d(axes), names):
        for r in records:
            xs = [p["round"] for p in r["curve"]]
            g = [p["gains"][name] for p in r["curve"]]
            ax.errorbar(xs, [x["gain"] for x in g], yerr=[[x["gain"] - x["ci_low"] for x in g],
                                                           [x["ci_high"] - x["gain"] for x in g]],
                        marker="o", capsize=3, label=r["setting"])
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_title(f"held-out gain over the untrained policy: {name}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default="lr1e-3", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--eval-prompts", type=int, default=36)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--every", type=int, default=2, help="score every k-th round's adapter")
    args = parser.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = [study_setting(n, SETTINGS[n], args.out, args.eval_prompts, args.eval_samples, args.every) for n in names]
    write_report(records, args.out, args.eval_prompts, args.eval_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
