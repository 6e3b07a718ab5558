"""Every setting of a reward-model fit and its default, in one place.

``firm reward fit`` makes one flag per field (``--lora-r 8``), with the string under each field
as its help; the fitted model's ``firm_reward.json`` records the whole config. The defaults are
the settings the shipped models were fitted with, except where their fit commands (see
docs/reward-models.md) set another value.
"""

from __future__ import annotations

from dataclasses import dataclass

from firm.rewards.backbones import BACKBONES, check_backbone
from firm.rewards.encoding import InputFormat
from firm.rewards.errors import RewardModelError

HEADS = ("lora", "probe", "ngram")
SELECTIONS = ("accuracy", "length-controlled")


@dataclass
class FitConfig:
    """Everything that decides a fit."""

    objective: str = "reward"
    """objective label stored in the model and used as its metric name, e.g. helpful or harmless (firm reward fit: the --out directory's name when not given)"""
    backbone: str = "minilm"
    """minilm: MiniLM-L6 cross-encoder (fast); smollm2: the embedded SmolLM2-135M causal LM (see firm.rewards.backbones)"""
    base_path: str | None = None
    """a local Hugging Face model directory to use instead of the backbone's packaged weights"""
    num_layers: int | None = None
    """keep only the first N transformer blocks of the backbone: scoring then costs N / all of a full forward pass (none: all blocks)"""
    chat_template: bool = False
    """causal-LM backbones: read the conversation in the tokenizer's chat template, as the chat policy writes it (false: HH plain text)"""
    head: str = "lora"
    """lora: LoRA adapters + scalar head trained end to end; probe: frozen backbone and a linear Bradley-Terry head on its top block; ngram: no backbone, a linear Bradley-Terry head on hashed word n-grams of the response (firm.rewards.ngram)"""
    probe_l2: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    """probe and ngram heads: comma-separated L2 strengths tried by 5-fold cross-validation over prompts; the best is kept"""
    length_covariate: bool = False
    """probe and ngram heads: fit the log-length difference of the two responses as a covariate of the Bradley-Terry model and drop it at scoring, so that the head learns what predicts preference beyond length (AlpacaEval's length control)"""
    select_by: str = "accuracy"
    """probe and ngram heads: what cross-validation maximises when it picks the L2 strength: accuracy, or length-controlled (the mean of the accuracies where the chosen response is shorter and where it is longer)"""
    ngram_features: int = 2**18
    """ngram head: hash buckets the n-grams are counted into (one weight each)"""
    ngram_max: int = 2
    """ngram head: longest n-gram counted (1: single words)"""
    epochs: int = 2
    """LoRA head: passes over the training pairs"""
    learning_rate: float = 5e-4
    """LoRA head: AdamW peak step size (linear warm-up, then linear decay to zero)"""
    batch_pairs: int = 8
    """LoRA head: preference pairs per optimizer step"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r); 32 is 2 x the default rank, as the shipped helpful model was fitted"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input during the fit"""
    trainable_layers: int | None = None
    """LoRA head: adapt only the top N transformer blocks; the frozen blocks below run once and are cached, which makes each epoch much cheaper (none: all blocks)"""
    max_length: int = 256
    """tokens of prompt + response; the prompt is cut from the left"""
    max_response_tokens: int = 192
    """tokens of the response kept from its start"""
    center_rewards_coefficient: float = 0.01
    """LoRA head: weight of (r_chosen + r_rejected)^2 in the loss, which keeps rewards centred on zero (TRL's name)"""
    warmup_fraction: float = 0.1
    """LoRA head: share of the steps spent warming the learning rate up"""
    seed: int = 0
    """seed of the head's initialisation and of the batch order"""
    min_pairs: int = 8
    """refuse to fit on fewer training pairs than this"""
    log_every: int = 20
    """LoRA head: log the loss every N steps"""

    def input_format(self) -> InputFormat:
        """How this fit's backbone reads a (prompt, response)."""
        return InputFormat(BACKBONES[self.backbone]["kind"], self.max_length, self.max_response_tokens,
                           self.chat_template)

    def validate(self) -> "FitConfig":
        """Raise RewardModelError if the settings cannot make a fit; return self."""
        check_backbone(self.backbone)
        if not 0 < self.max_response_tokens <= self.max_length - 8:
            raise RewardModelError(f"max response tokens ({self.max_response_tokens}) must be positive and leave "
                                   f"room for the prompt within max length ({self.max_length})")
        if self.epochs < 1 or self.batch_pairs < 1:
            raise RewardModelError("epochs and pairs per batch must be at least 1")
        if self.head not in HEADS:
            raise RewardModelError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.select_by not in SELECTIONS:
            raise RewardModelError(f"unknown selection {self.select_by!r}; choose one of {', '.join(SELECTIONS)}")
        if self.length_covariate and self.head == "lora":
            raise RewardModelError("the length covariate is fitted by the probe and ngram heads only (--head probe or ngram)")
        if self.ngram_features < 2 or self.ngram_max < 1:
            raise RewardModelError("ngram features must be at least 2 buckets and ngram max at least 1")
        if self.chat_template and BACKBONES[self.backbone]["kind"] != "causal-lm":
            raise RewardModelError("the chat template input is for causal-LM backbones only")
        return self
