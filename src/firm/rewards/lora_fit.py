"""Fitting a "lora" head: LoRA adapters and a scalar head trained end to end on preference pairs.

Loss per pair: -log sigmoid(r_c - r_r) + c * (r_c + r_r)^2, the second term (TRL's
``center_rewards_coefficient``) keeps rewards centred on zero so that their scale is comparable
across objectives. Only the LoRA matrices and the head are trained; with ``trainable_layers``
only the top blocks are adapted and the frozen blocks below run once (firm.rewards.frozen_blocks).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from firm.rewards.backbones import BACKBONES, load_base
from firm.rewards.descriptor import new_descriptor
from firm.rewards.encoding import collate, encode_pairs
from firm.rewards.errors import RewardModelError
from firm.rewards.fit_config import FitConfig
from firm.rewards.fitted import FittedRewardModel
from firm.rewards.frozen_blocks import forward_from_states, frozen_block_states
from firm.rewards.pairs import PreferencePair


def _lr_lambda(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _training_batches(lengths: Sequence[int], batch_pairs: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 32 batches by length: random order, little padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_pairs * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda index: lengths[index])
        batches.extend(chunk[i:i + batch_pairs] for i in range(0, len(chunk), batch_pairs))
    rng.shuffle(batches)
    return batches


def _top_layers(base, trainable_layers: int | None) -> list[int] | None:
    """Indices of the top ``trainable_layers`` transformer blocks (None: all of them).

    Adapting only the top blocks is the cheap way to fit on a CPU: back-propagation stops at
    the lowest adapted block, so the frozen lower blocks cost a forward pass only."""
    if trainable_layers is None:
        return None
    n_layers = base.config.num_hidden_layers
    if not 1 <= trainable_layers <= n_layers:
        raise RewardModelError(f"trainable layers must be between 1 and {n_layers}, got {trainable_layers}")
    return list(range(n_layers - trainable_layers, n_layers))


def fit_lora(train_pairs: Sequence[PreferencePair], config: FitConfig,
             log: Callable[[str], None] = print) -> tuple[FittedRewardModel, dict[str, Any]]:
    """Train LoRA adapters and a scalar head on ``train_pairs``; return the model and training stats."""
    from peft import LoraConfig, TaskType, get_peft_model

    fit_started = time.perf_counter()
    torch.manual_seed(config.seed)
    base, tokenizer = load_base(config.backbone, config.base_path, config.num_layers)
    spec = BACKBONES[config.backbone]
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=spec["lora_targets"],
                      layers_to_transform=_top_layers(base, config.trainable_layers),
                      layers_pattern=spec["layers_pattern"] if config.trainable_layers else None,
                      modules_to_save=list(spec["fully_trained"]) or None)
    model = get_peft_model(base, lora)
    # Tokenise once; every epoch reuses the ids.
    fmt = config.input_format()
    chosen, rejected = encode_pairs(tokenizer, fmt, train_pairs)
    lengths = [max(len(c[0]), len(r[0])) for c, r in zip(chosen, rejected)]

    n_frozen = base.config.num_hidden_layers - config.trainable_layers if config.trainable_layers else 0
    chosen_states = rejected_states = None
    if n_frozen:
        chosen_states = frozen_block_states(model, chosen, n_frozen, tokenizer.pad_token_id, fmt.kind)
        rejected_states = frozen_block_states(model, rejected, n_frozen, tokenizer.pad_token_id, fmt.kind)
        log(f"cached the output of the {n_frozen} frozen blocks ({time.perf_counter() - fit_started:.0f}s)")

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_pairs)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, config.warmup_fraction))
    rng = random.Random(config.seed)
    n_trainable = sum(parameter.numel() for parameter in trainable)
    log(f"fitting {config.objective!r}: {len(train_pairs)} pairs, backbone {config.backbone}, "
        f"{n_trainable:,} trainable parameters, {total_steps} steps")

    model.train()
    step = 0
    epoch_loss = epoch_correct = 0.0
    for epoch in range(config.epochs):
        epoch_loss = epoch_correct = 0.0
        for batch in _training_batches(lengths, config.batch_pairs, rng):
            examples = [chosen[i] for i in batch] + [rejected[i] for i in batch]
            if n_frozen:
                states = [chosen_states[i] for i in batch] + [rejected_states[i] for i in batch]
                rewards = forward_from_states(model, examples, states, n_frozen, tokenizer.pad_token_id, fmt.kind)
            else:
                rewards = model(**collate(examples, tokenizer.pad_token_id, fmt.kind)).logits[:, 0]
            reward_chosen, reward_rejected = rewards[: len(batch)], rewards[len(batch):]
            loss = (-F.logsigmoid(reward_chosen - reward_rejected).mean()
                    + config.center_rewards_coefficient * ((reward_chosen + reward_rejected) ** 2).mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            epoch_loss += loss.item() * len(batch)
            epoch_correct += (reward_chosen > reward_rejected).sum().item()
            if step % config.log_every == 0 or step == total_steps:
                log(f"  epoch {epoch + 1} step {step}/{total_steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - fit_started:.0f}s)")
        log(f"  epoch {epoch + 1}: mean loss {epoch_loss / len(train_pairs):.4f}, "
            f"running train accuracy {epoch_correct / len(train_pairs):.3f}")
    model.eval()

    stats = {
        "train_seconds": round(time.perf_counter() - fit_started, 1),
        "frozen_blocks_cached": n_frozen,
        "steps": total_steps,
        "trainable_parameters": n_trainable,
        "last_epoch_loss": round(epoch_loss / len(train_pairs), 4),
        "last_epoch_running_accuracy": round(epoch_correct / len(train_pairs), 4),
    }
    descriptor = new_descriptor(config, fmt, stats,
                                "adapter_model.safetensors: LoRA matrices and the scalar head (PEFT format)")
    return FittedRewardModel(model, tokenizer, descriptor), stats
