"""Cache, once, what a frozen trunk (SmolLM2 or MiniLM) says about every TRAINING pair of a pair file.

Reward candidates (studies/helpful_reward_study.py) are compared by cross-validation on
pooled states of the frozen trunk; computing those states is the expensive part (minutes to an
hour on a shared 2-core CPU), fitting a linear head on them takes seconds. This script runs the
trunk once over the training part of the split (``split_by_prompt``, test fraction 0.2, seed 0,
as ``firm reward fit`` uses) and saves, per pair and side, the pooled [last token, mean over
response] states of several blocks, plus lengths and prompt groups. The held-out part is never
read. Work is saved in chunks, so an interrupted run resumes.

    python studies/cache_trunk_features.py --data ../shared/data/alpaca-eval/gpt4-pairs-a.jsonl.gz \
        --out CACHE/helpful
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from firm.rewards.backbones import BACKBONES, load_base, transformer_blocks
from firm.rewards.encoding import InputFormat, collate, encode_pairs, length_sorted_batches
from firm.rewards.frozen_blocks import pool_response_states
from firm.rewards.pairs import load_pairs, prompt_group_key, split_by_prompt

BLOCKS = {"smollm2": (4, 6, 8), "minilm": (3, 6)}
CHUNK_PAIRS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="folder for the chunk files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", type=int, default=0, help="this process's share: chunks k with k %% workers == worker")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the work")
    parser.add_argument("--reverse", action="store_true",
                        help="take chunks from the last one back (a helper joining running workers)")
    parser.add_argument("--backbone", choices=sorted(BLOCKS), default="smollm2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-response-tokens", type=int, default=96)
    parser.add_argument("--blocks", default=None,
                        help="comma-separated blocks to keep (default: %s)" % {k: v for k, v in BLOCKS.items()})
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="only the first N training pairs (whole chunks): a quick look before the full run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, _ = split_by_prompt(load_pairs(args.data), 0.2, 0)
    blocks = tuple(int(b) for b in args.blocks.split(",")) if args.blocks else BLOCKS[args.backbone]
    base, tokenizer = load_base(args.backbone, None, max(blocks))
    base.eval()
    causal = BACKBONES[args.backbone]["kind"] == "causal-lm"
    # SmolLM2 reads the chat template as the policy writes it; MiniLM the cross-encoder pair
    fmt = InputFormat(BACKBONES[args.backbone]["kind"], args.max_length, args.max_response_tokens, causal)
    captured: dict[int, torch.Tensor] = {}
    for block, module in enumerate(transformer_blocks(base), start=1):
        module.register_forward_hook(lambda m, i, output, block=block: captured.__setitem__(
            block, output[0] if isinstance(output, tuple) else output))
    started = time.perf_counter()
    limit = len(train) if args.max_pairs is None else min(len(train), args.max_pairs)
    starts = list(range(0, limit, CHUNK_PAIRS))
    for chunk_start in reversed(starts) if args.reverse else starts:
        if (chunk_start // CHUNK_PAIRS) % args.workers != args.worker:
            continue
        path, marker = out / f"chunk{chunk_start:05d}.npz", out / f"chunk{chunk_start:05d}.started"
        if path.exists() or marker.exists():
            continue
        marker.touch()
        pairs = train[chunk_start:chunk_start + CHUNK_PAIRS]
        chosen, rejected = encode_pairs(tokenizer, fmt, pairs)
        examples = chosen + rejected
        features = np.zeros((len(examples), len(blocks), 2 * base.config.hidden_size), np.float32)
        for batch in length_sorted_batches([len(ids) for ids, _ in examples], 16):
            with torch.no_grad():
                base(**collate([examples[index] for index in batch], tokenizer.pad_token_id, fmt.kind))
            for row, index in enumerate(batch):
                ids, types = examples[index]
                for column, block in enumerate(blocks):
                    features[index, column] = pool_response_states(captured[block][row, : len(ids)].float(),
                                                                   types).numpy()
        n = len(pairs)
        np.savez(path, chosen=features[:n].astype(np.float16), rejected=features[n:].astype(np.float16),
                 blocks=np.array(blocks),
                 chosen_chars=np.array([len(p.chosen) for p in pairs]),
                 rejected_chars=np.array([len(p.rejected) for p in pairs]),
                 chosen_tokens=np.array([sum(t) for _, t in chosen]),
                 rejected_tokens=np.array([sum(t) for _, t in rejected]),
                 groups=np.array([prompt_group_key(p.prompt) for p in pairs]),
                 origin=np.array([p.origin for p in pairs]))
        marker.unlink()
        print(f"{chunk_start + n}/{len(train)} pairs ({time.perf_counter() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
