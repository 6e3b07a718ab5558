"""Tiny offline models for tests and device checks: a ChatML tokenizer and a Llama config,
built in memory, no hub.

They mirror SmolLM2-135M-Instruct's conventions (ChatML chat template, eos = pad = <|im_end|>,
<|im_start|> / <|im_end|> as single tokens) at a size that trains and runs in milliseconds.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_PARAGRAPH = """\
The quick brown fox jumps over the lazy dog. How can I help you today? I would like to know how
to bake bread at home: mix flour, water, yeast and salt, knead the dough, let it rise, then bake
it in a hot oven. Please explain why the sky is blue. Sunlight is scattered by the air, and blue
light is scattered more than red light. I am sorry, but I cannot help with that request because
it could hurt someone. Thank you for asking a kind question! What is the capital of France?
Paris is the capital of France. Tell me a story about a dragon who learned to read books.
Numbers like 1, 2, 3, 42 and 2024 appear too; so do symbols such as $, %, &, (, ) and quotes.
"""

VOCAB_SIZE = 384


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on one paragraph: any text tokenises (no unknowns), vocab ~384."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_PARAGRAPH.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A 2-layer, 32-wide Llama whose vocabulary matches `tokenizer`."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
