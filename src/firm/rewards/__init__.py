"""Reward models: one per objective, each scoring (prompt, response) pairs with one float.

The trainer asks for M objectives as M spec strings and gets back M `RewardModel`s. A spec is one of

* ``"hf:<hub id or local path>"``, or a local directory holding a ``config.json``: a Hugging Face
  sequence-classification reward model (one logit) fed the Anthropic HH formulation
  ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``, e.g. Ray2333/gpt2-large-helpful-reward_model.
* a local directory holding ``firm_reward.json``, or ``"embedded:<name>"``: a reward model fitted by
  this project (`firm.rewards.fitted.FittedRewardModel`); embedded ones ship inside the package.
* ``"relevance"`` / ``"civility"``: weak offline proxies for helpfulness / harmlessness
  (firm.rewards.scorers says how weak).

Heavy models load once per process (the Flower simulation reuses one worker for many clients), so
every build goes through a module-level cache keyed by the normalised spec and the device.

The package, one job per module:

* this module: the `RewardModel` interface, reward specs, building rewards from them;
* ``scorers``: hub classifiers and the offline proxies; ``fitted``: the reward models firm fits;
* ``pairs``: preference pairs (reading, splitting by prompt); ``pairwise``: how well a reward
  orders them; ``pipeline``: the whole fit behind ``firm reward fit``;
* ``fit_config``: the settings of a fit; ``lora_fit`` / ``probe_fit``: the two kinds of head;
* ``backbones``, ``encoding``, ``frozen_blocks``: the base models, their inputs, and the
  states of their frozen blocks; ``descriptor`` / ``card``: ``firm_reward.json`` and README.md
  of a fitted directory; ``errors``: the input errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Literal, Protocol, Sequence, TypeVar

import torch

from firm.rewards.descriptor import DESCRIPTOR_FILE, EMBEDDED_REWARD_DIR
from firm.rewards.errors import PairFileError, RewardModelError, RewardSpecError
from firm.rewards.scorers import (
    CIVILITY_SPEC,
    RELEVANCE_SPEC,
    CivilityReward,
    HFSequenceClassificationReward,
    RelevanceReward,
    check_batch,
    load_hf_classifier,
    load_minilm,
    load_offensive_prob,
)
from firm.rewards.trunk import clear_trunks

if TYPE_CHECKING:
    from firm.prompts import Prompt

HF_CONFIG_FILE = "config.json"
HF_PREFIX = "hf:"
EMBEDDED_PREFIX = "embedded:"

ACCEPTED_FORMS = (
    "'hf:<hub id or local path>' (Hugging Face sequence-classification reward model)",
    "a local directory containing config.json (same as 'hf:<path>')",
    f"a local directory containing {DESCRIPTOR_FILE} (a reward model fitted by firm)",
    "'embedded:<name>' (a fitted reward model shipped inside the firm package)",
    f"'{RELEVANCE_SPEC}' (MiniLM prompt/response cosine similarity, offline helpfulness proxy)",
    f"'{CIVILITY_SPEC}' (1 - P(offensive) from alt-profanity-check, offline harmlessness proxy)",
)

RewardKind = Literal["hf", "fitted", "relevance", "civility"]
T = TypeVar("T")


class RewardModel(Protocol):
    """Scores (prompt, response) pairs for one objective; `name` labels that objective in metrics."""

    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Return a [B] float32 CPU tensor, higher = better."""
        ...


# --------------------------------------------------------------------------------------------
# Parsing specs (pure apart from looking at the file system)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedSpec:
    """A spec reduced to what to load: `target` is a hub id or a resolved local path ('' if none)."""

    kind: RewardKind
    target: str
    label: str  # objective name for hf/relevance/civility; directory name for fitted models


def accepted_forms_text() -> str:
    return "accepted forms: " + "; ".join(ACCEPTED_FORMS)


def embedded_rewards_dir() -> Path:
    """Folder inside the installed package where embedded fitted reward models live."""
    return EMBEDDED_REWARD_DIR


def available_embedded_rewards() -> list[str]:
    """Names usable as 'embedded:<name>' (sub-folders holding firm_reward.json); may be empty."""
    folder = embedded_rewards_dir()
    if not folder.is_dir():
        return []
    return sorted(marker.parent.name for marker in folder.glob(f"*/{DESCRIPTOR_FILE}"))


def _looks_like_local_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\")) or Path(text).expanduser().exists()


def _parse_hf_target(target: str, spec: str) -> ParsedSpec:
    if not target:
        raise RewardSpecError(f"reward spec {spec!r} names no model after 'hf:'")
    if not _looks_like_local_path(target):
        hub_id = target.rstrip("/")
        return ParsedSpec("hf", hub_id, hub_id.rsplit("/", 1)[-1])
    path = Path(target).expanduser().resolve()
    if not path.is_dir():
        raise RewardSpecError(f"reward spec {spec!r}: no such directory {str(path)!r}")
    if not (path / HF_CONFIG_FILE).is_file():
        raise RewardSpecError(
            f"reward spec {spec!r}: directory {str(path)!r} has no {HF_CONFIG_FILE}, so it is not a "
            "Hugging Face model saved with save_pretrained"
        )
    return ParsedSpec("hf", str(path), path.name)


def _parse_embedded(name: str, spec: str) -> ParsedSpec:
    available = available_embedded_rewards()
    if name not in available:
        listing = ", ".join(available) if available else "none are installed"
        raise RewardSpecError(
            f"reward spec {spec!r}: no embedded reward model named {name!r} under "
            f"{embedded_rewards_dir()} (available: {listing})"
        )
    path = embedded_rewards_dir() / name
    return ParsedSpec("fitted", str(path.resolve()), name)


def _parse_local_directory(spec: str) -> ParsedSpec:
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        if _looks_like_local_path(spec):
            raise RewardSpecError(f"reward spec {spec!r}: no such directory {str(path)!r}")
        raise RewardSpecError(
            f"unknown reward spec {spec!r} (use 'hf:{spec}' for a Hugging Face hub id); "
            + accepted_forms_text()
        )
    if not path.is_dir():
        raise RewardSpecError(f"reward spec {spec!r} is a file; a reward model is a directory")
    if (path / DESCRIPTOR_FILE).is_file():
        return ParsedSpec("fitted", str(path), path.name)
    if (path / HF_CONFIG_FILE).is_file():
        return ParsedSpec("hf", str(path), path.name)
    raise RewardSpecError(
        f"reward spec {spec!r}: directory {str(path)!r} has neither {DESCRIPTOR_FILE} nor "
        f"{HF_CONFIG_FILE}; " + accepted_forms_text()
    )


def parse_reward_spec(spec: str) -> ParsedSpec:
    """Decide what a spec names, checking local paths exist; hub ids are only checked on load."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"a reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == RELEVANCE_SPEC:
        return ParsedSpec("relevance", "", RELEVANCE_SPEC)
    if spec == CIVILITY_SPEC:
        return ParsedSpec("civility", "", CIVILITY_SPEC)
    if spec.startswith(HF_PREFIX):
        return _parse_hf_target(spec[len(HF_PREFIX) :].strip(), spec)
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :].strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise RewardSpecError(f"reward spec {spec!r}: an embedded name is a plain folder name")
        return _parse_embedded(name, spec)
    return _parse_local_directory(spec)


def describe_reward(spec: str) -> str:
    """One line saying what a spec scores with, for logs; loads nothing."""
    parsed = parse_reward_spec(spec)
    if parsed.kind == "relevance":
        return (
            "relevance: cosine similarity of all-MiniLM-L6-v2 embeddings of prompt and response "
            "(offline helpfulness proxy; rewards topical echo, not quality)"
        )
    if parsed.kind == "civility":
        return (
            "civility: 1 - P(offensive response) from alt-profanity-check "
            "(offline harmlessness proxy; near chance, 53.5%, on HH-RLHF harmless pairs)"
        )
    if parsed.kind == "hf":
        return (
            f"{parsed.label}: Hugging Face sequence-classification reward model {parsed.target} "
            "on HH-formatted text"
        )
    return f"fitted reward model {parsed.label!r} at {parsed.target}"


# --------------------------------------------------------------------------------------------
# Loading (cached once per process)
# --------------------------------------------------------------------------------------------

_CACHE: dict[tuple[Hashable, ...], Any] = {}


def _cached(key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def clear_reward_cache() -> None:
    """Forget every loaded reward model and shared trunk (frees memory; the next build loads again)."""
    _CACHE.clear()
    clear_trunks()


def _build_hf(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    key = ("hf", parsed.target, device)
    model, tokenizer = _cached(key, lambda: load_hf_classifier(parsed.target, device))
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    effective_max_length = min(max_length, max_positions) if max_positions else max_length
    return HFSequenceClassificationReward(
        name=parsed.label,
        model=model,
        tokenizer=tokenizer,
        device=device,
        batch_size=batch_size,
        max_length=effective_max_length,
    )


def _build_relevance(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    encoder = _cached(("minilm", device), lambda: load_minilm(device))
    return RelevanceReward(encoder=encoder, batch_size=batch_size)


def _build_civility(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    return CivilityReward(predict_offensive_prob=load_offensive_prob())


def _load_fitted(path: str, device: str) -> RewardModel:
    try:
        # Imported on this path only: a process scoring with hub or proxy rewards never needs the
        # fitted-model stack, and a broken install of it is a RewardSpecError naming the cause.
        from firm.rewards.fitted import FittedRewardModel
    except ImportError as error:
        raise RewardSpecError(
            f"fitted reward models are not available: importing firm.rewards.fitted failed ({error})"
        ) from error
    if _fitted_head(path) == "ngram":
        from firm.rewards.ngram import NgramRewardModel  # deferred like fitted, and loaded after it

        return NgramRewardModel.load(path)
    return FittedRewardModel.load(path, device=device)


def _fitted_head(path: str) -> str:
    """The head a fitted directory's descriptor names ("lora" when it names none or is unreadable:
    the loader then reports what is wrong)."""
    try:
        return str(json.loads((Path(path) / DESCRIPTOR_FILE).read_text()).get("head", "lora"))
    except (OSError, ValueError, AttributeError):
        return "lora"


def _build_fitted(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    return _cached(("fitted", parsed.target, device), lambda: _load_fitted(parsed.target, device))


_BUILDERS: dict[str, Callable[[ParsedSpec, str, int, int], RewardModel]] = {
    "hf": _build_hf,
    "relevance": _build_relevance,
    "civility": _build_civility,
    "fitted": _build_fitted,
}


def build_reward(
    spec: str, *, device: str = "cpu", batch_size: int = 16, max_length: int = 512
) -> RewardModel:
    """Load (or reuse from this process's cache) the reward model a spec names."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    parsed = parse_reward_spec(spec)
    key = ("reward", parsed, str(device), batch_size, max_length)
    return _cached(key, lambda: _BUILDERS[parsed.kind](parsed, str(device), batch_size, max_length))


def build_rewards(specs: Sequence[str], **kwargs: Any) -> list[RewardModel]:
    """Build one reward model per objective; their names must differ since metrics key on them."""
    if isinstance(specs, str):
        raise RewardSpecError(f"build_rewards takes a list of specs, got the single string {specs!r}")
    if len(specs) == 0:
        raise RewardSpecError("no reward specs given: the trainer needs at least one objective")
    rewards = [build_reward(spec, **kwargs) for spec in specs]
    spec_by_name: dict[str, str] = {}
    for spec, reward in zip(specs, rewards):
        if reward.name in spec_by_name:
            first = spec_by_name[reward.name]
            if first == spec:
                raise RewardSpecError(
                    f"reward spec {spec!r} is listed twice; each objective needs its own reward"
                )
            raise RewardSpecError(
                f"reward specs {first!r} and {spec!r} both give the objective name "
                f"{reward.name!r}; each objective needs its own name (metric keys use it), "
                "so rename one model's directory"
            )
        spec_by_name[reward.name] = spec
    return rewards


__all__ = [
    "ACCEPTED_FORMS", "CivilityReward", "HFSequenceClassificationReward", "PairFileError", "ParsedSpec",
    "RelevanceReward", "RewardModel", "RewardModelError", "RewardSpecError", "available_embedded_rewards",
    "build_reward", "build_rewards", "check_batch", "clear_reward_cache", "describe_reward",
    "embedded_rewards_dir", "parse_reward_spec",
]
