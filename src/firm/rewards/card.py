"""The model card: the README.md written next to a fitted reward model, from its descriptor."""

from __future__ import annotations

from typing import Any

from firm.rewards.descriptor import NGRAM_HEAD_FILE, PROBE_HEAD_FILE


def model_card(descriptor: dict[str, Any]) -> str:
    """A Hugging Face style README.md: what the model is, what it saw, how good it is."""
    data = descriptor.get("data") or {}
    heldout = descriptor.get("heldout")
    training = descriptor.get("training", {})
    fit = descriptor.get("fit_config", {})
    base = descriptor.get("base_hub_id") or descriptor.get("base_path")
    head = descriptor.get("head", "lora")
    probe, ngram = head == "probe", head == "ngram"
    blocks = f", first {descriptor['num_layers']} blocks only" if descriptor.get("num_layers") else ""
    lines = [
        "---",
        f"library_name: {'firm' if probe or ngram else 'peft'}",
        *([f"base_model: {base}"] if base else []),
        "tags: [reward-model, bradley-terry, firm]",
        "---",
        "",
        f"# FIRM reward model: {descriptor['objective']}",
        "",
        f"A Bradley-Terry reward model (higher = more preferred) fitted by `firm reward fit`. "
        + (f"No neural backbone: a linear head on {training.get('features')} (L2 {training.get('l2')}, chosen by "
           f"{training.get('cv_folds')}-fold cross-validation over prompts"
           + (", fitted beside a length covariate that is dropped at scoring" if training.get("length_covariate")
              else "") + "). It reads the response only" if ngram else
           f"Backbone `{descriptor['backbone']}` ({base}{blocks}, frozen) with a linear head on the last-token "
           f"and mean response states of its top block (L2 {training.get('l2')}, chosen by "
           f"{training.get('cv_folds')}-fold cross-validation over prompts"
           + (", fitted beside a length covariate that is dropped at scoring" if training.get("length_covariate")
              else "") + ")" if probe else
           f"Backbone `{descriptor['backbone']}` ({base}{blocks}) with LoRA adapters (r={fit.get('lora_r')}) on "
           f"{'the top ' + str(fit['trainable_layers']) if fit.get('trainable_layers') else 'all'} transformer "
           "blocks and a scalar head on the last token")
        + ("." if ngram else f"; input: {descriptor['formulation']}, at most "
           f"{descriptor['input_format']['max_length']} tokens (the prompt is cut from the left, the response kept "
           "from its start)."),
        "",
        "## Data and split",
        "",
        f"- source: `{data.get('source', 'unknown')}` ({data.get('n_pairs', '?')} pairs)",
        f"- trained on {data.get('n_train', '?')} pairs, held out {data.get('n_test', '?')} pairs; "
        f"split by {data.get('split', {}).get('by', '?')}, test fraction "
        f"{data.get('split', {}).get('test_fraction', '?')}, seed {data.get('split', {}).get('seed', '?')}",
        (f"- cross-validated accuracy by L2: {training.get('cv_accuracy_by_l2')}; "
         f"{training.get('train_seconds')} s on CPU" if probe or ngram else
         f"- {fit.get('epochs')} epochs, learning rate {fit.get('learning_rate')}, "
         f"{fit.get('batch_pairs')} pairs per batch, {training.get('train_seconds')} s on CPU"),
        "",
        "## Held-out accuracy",
        "",
    ]
    if heldout is None:
        lines.append("No pairs were held out: the accuracy of this model is unmeasured.")
    else:
        lines += [
            f"- pairwise accuracy: **{heldout['accuracy']:.3f}** "
            f"(95% bootstrap CI {heldout['ci95'][0]:.3f}-{heldout['ci95'][1]:.3f}, {heldout['n_pairs']} pairs)",
            f"- mean reward margin (chosen - rejected): {heldout['mean_margin']:.3f}",
            f"- reward vs response length (characters): Pearson {_fmt(heldout['length_pearson'])}, "
            f"Spearman {_fmt(heldout['length_spearman'])}",
            f"- a reward that only preferred the longer response would score {heldout['longer_chosen_rate']:.3f}",
        ]
        if heldout.get("length_controlled_accuracy") is not None:
            lines += [
                f"- where the chosen response is the shorter one: {_fmt(heldout['chosen_shorter_accuracy'])} "
                f"({_interval(heldout['chosen_shorter_ci95'])}, {heldout['chosen_shorter_pairs']} pairs); where it "
                f"is the longer one: {_fmt(heldout['chosen_longer_accuracy'])} "
                f"({_interval(heldout['chosen_longer_ci95'])}, {heldout['chosen_longer_pairs']} pairs)",
                f"- length-controlled accuracy (mean of the two): **{_fmt(heldout['length_controlled_accuracy'])}** "
                f"({_interval(heldout['length_controlled_ci95'])}); the longer-wins rule scores 0.5 on it",
            ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from firm.rewards import build_reward",
        "reward = build_reward(\"path/to/this/directory\")",
        "reward.score([\"How do I boil an egg?\"], [\"Simmer it for nine minutes, then cool it in cold water.\"])",
        "```",
        "",
        "Or `firm reward eval --model path/to/this/directory --data pairs.jsonl`. "
        + (f"The head is `{NGRAM_HEAD_FILE}`: reward = sum of the weights of the response's n-gram buckets."
           if ngram else
           f"The head is `{PROBE_HEAD_FILE}`: reward = weight . features + bias, features as described above."
           if probe else
           "With hub access the directory also loads as a plain PEFT adapter "
           "(`AutoPeftModelForSequenceClassification`"
           + (f", passing `num_hidden_layers={descriptor['num_layers']}`" if descriptor.get("num_layers") else "")
           + "); build inputs as described above."),
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(bounds: list | None) -> str:
    return "95% CI n/a" if not bounds or None in bounds else f"95% CI {bounds[0]:.3f}-{bounds[1]:.3f}"
