"""Every bad input fails fast and cleanly.

One table of bad inputs through ``firm.cli.main``: CLI flags, config values, prompt, pair,
reward, policy and adapter files, run directories. Each row asserts exit code 2, one line on
stderr that starts with "error: " and names the problem (no traceback), and that no file under
the test's folder (nor the tiny policy) changed: the check comes before anything is written, a
model is loaded or Ray starts.

Bad client replies are the strategy's: tests/test_strategy.py::ATTACKS is their table (each
hostile reply rejected with its reason while the honest ones are aggregated), not repeated here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from firm.cli import main

REWARDS = ["--rewards", "relevance,civility"]

GOOD_PAIR = {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.",
             "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No."}
GOOD_PAIR_2 = {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
               "rejected": "\n\nHuman: Name a colour.\n\nAssistant: I will not."}


class Files:
    """The inputs the rows point at, made fresh in the test's tmp_path."""

    def __init__(self, root: Path, policy: str):
        self.root, self.policy = root, policy
        self.run = root / "new-run"  # where a train row would create its run (must stay absent)

        def write(rel: str, text: str | bytes) -> Path:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
            return path

        def jsonl(*records) -> str:
            return "".join(json.dumps(r) + "\n" for r in records)

        self.write = write
        # a regular file: a path under it cannot be created, even by root
        self.a_file = write("a-file", "not a folder\n")
        # prompt files
        self.malformed_prompts = write("prompts/malformed.jsonl",
                                       jsonl({"prompt": "hello"}, {"prompt": "fine"}) + '{"prompt": \n')
        self.no_field_prompts = write("prompts/no-field.jsonl", jsonl({"prompt": "hello"}, {"text": "hi"}))
        self.wrong_type_prompts = write("prompts/wrong-type.jsonl", jsonl({"prompt": 42}))
        self.empty_prompts = write("prompts/empty.jsonl", "")
        self.blank_prompts = write("prompts/blank.jsonl", jsonl({"prompt": "   "}))
        self.three_prompts = write("prompts/three.jsonl", jsonl(*({"prompt": f"question {i}"} for i in range(3))))
        # pair files
        self.good_pairs = write("pairs/good.jsonl", jsonl(GOOD_PAIR, GOOD_PAIR_2))
        self.pairs_missing_key = write("pairs/missing-key.jsonl",
                                       jsonl(GOOD_PAIR, {"chosen": GOOD_PAIR_2["chosen"]}))
        self.pairs_not_json = write("pairs/not-json.jsonl", jsonl(GOOD_PAIR) + "chosen: yes\n")
        self.pairs_empty = write("pairs/empty.jsonl", "")
        # reward directories
        self.reward_garbage_config = write("rewards/garbage-config/config.json", "{not json").parent
        self.reward_config_list = write("rewards/config-list/config.json", "[1, 2]").parent
        self.reward_garbage_descriptor = write("rewards/garbage-descriptor/firm_reward.json", "{\"format\": ").parent
        self.reward_wrong_descriptor = write("rewards/wrong-descriptor/firm_reward.json",
                                             json.dumps({"format": "something-else"})).parent
        self.reward_empty_dir = root / "rewards" / "empty"
        self.reward_empty_dir.mkdir(parents=True)
        # policy directories
        self.policy_corrupt_config = write("policies/corrupt/config.json", "{\"model_type\": \"llama\",").parent
        self.policy_no_config = root / "policies" / "empty"
        self.policy_no_config.mkdir(parents=True)
        # adapters
        adapter_config = json.dumps({"peft_type": "LORA", "base_model_name_or_path": policy, "r": 2,
                                     "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                                     "task_type": "CAUSAL_LM"})
        self.adapter_corrupt_config = write("adapters/corrupt-config/adapter_config.json", "{\"peft_type\": ").parent
        self.adapter_config_list = write("adapters/config-list/adapter_config.json", "[]").parent
        truncated = write("adapters/truncated/adapter_config.json", adapter_config).parent
        save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)}, str(truncated / "full.safetensors"))
        full = (truncated / "full.safetensors").read_bytes()
        (truncated / "full.safetensors").unlink()
        write("adapters/truncated/adapter_model.safetensors", full[: len(full) // 2])
        write("adapters/missing-base/adapter_model.safetensors", full)
        self.adapter_truncated = truncated
        self.adapter_no_weights = write("adapters/no-weights/adapter_config.json", adapter_config).parent
        self.adapter_missing_base = write("adapters/missing-base/adapter_config.json", json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(root / "no-such-base")})).parent
        # run directories
        config = {"policy": policy, "rewards": "relevance,civility", "num_clients": 2, "num_rounds": 2}
        self.existing_run = self._run("runs/existing", json.dumps(config), '{"completed_rounds": 1}',
                                      metrics=jsonl({"type": "round", "round": 1}))
        self.run_state_object = self._run("runs/state-object", json.dumps(config), "{}")
        self.run_state_list = self._run("runs/state-list", json.dumps(config), "[]")
        self.run_state_text = self._run("runs/state-text", json.dumps(config), '{"completed_rounds": "two"}')
        self.run_state_garbage = self._run("runs/state-garbage", json.dumps(config), '{"completed_rounds": 1')
        self.run_corrupt_config = self._run("runs/corrupt-config", "{\"policy\": ", '{"completed_rounds": 1}')
        self.run_config_list = self._run("runs/config-list", "[]", '{"completed_rounds": 1}')
        self.run_unknown_setting = self._run("runs/unknown-setting", json.dumps({**config, "warp": 9}),
                                             '{"completed_rounds": 1}')
        self.run_bad_setting = self._run("runs/bad-setting", json.dumps({**config, "beta": -1}),
                                         '{"completed_rounds": 1}')
        self.run_no_state = write("runs/no-state/config.json", json.dumps(config)).parent
        trained = jsonl({"type": "round", "round": 1, "algorithm": "firm", "reward/relevance": 0.1,
                         "reward/civility": 0.2})
        self.run_swapped = self._run("runs/swapped", json.dumps({**config, "rewards": "civility,relevance"}),
                                     '{"completed_rounds": 1}', metrics=trained)
        self.run_other_algorithm = self._run("runs/other-algorithm", json.dumps({**config, "algorithm": "mgda"}),
                                             '{"completed_rounds": 1}', metrics=trained)
        self.run_bool_rounds = self._run("runs/bool-rounds", json.dumps({**config, "num_rounds": True}),
                                         '{"completed_rounds": 1}', metrics=trained)
        self.run_number_policy = self._run("runs/number-policy", json.dumps({**config, "policy": 5}),
                                           '{"completed_rounds": 1}', metrics=trained)
        self.run_missing_prompts = self._run(
            "runs/missing-prompts", json.dumps({**config, "prompts": str(root / "gone.jsonl")}),
            '{"completed_rounds": 1}', metrics=trained)
        # a policy whose weights are a pickle (loading one can run code)
        self.pickled_policy = write("policies/pickled/config.json", (Path(policy) / "config.json").read_text()).parent
        write("policies/pickled/pytorch_model.bin", b"\x80\x04pickle")

    def _run(self, rel: str, config: str, state: str, metrics: str | None = None) -> Path:
        path = self.write(f"{rel}/config.json", config).parent
        self.write(f"{rel}/state.json", state)
        if metrics is not None:
            self.write(f"{rel}/metrics.jsonl", metrics)
        return path

    def train(self, *args: str) -> list[str]:
        """`firm train` on the tiny policy and the offline rewards, into a run dir that must stay absent."""
        return ["train", "--policy", self.policy, *REWARDS, "--run-dir", str(self.run), *args]

    def eval(self, *args: str) -> list[str]:
        return ["eval", "--policy", self.policy, *REWARDS, *args]


Row = Callable[[Files], list[str]]


def row(name: str, argv: Row, message: str | Callable[[Files], str], xfail: str | None = None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(argv, message, id=name, marks=marks)


BAD_INPUTS = [
    # ---- firm train: settings ------------------------------------------------------------------
    row("preference negative (a value, not a flag)", lambda f: f.train("--preference", "-0.5,1.5"),
        "preference must be non-negative"),
    row("preference does not sum to 1", lambda f: f.train("--preference", "0.5,0.6"), "must sum to 1"),
    row("preference of the wrong length", lambda f: f.train("--preference", "0.2,0.3,0.5"), "must have length 2"),
    row("preference not numbers", lambda f: f.train("--preference", "a,b"), "comma-separated numbers"),
    row("negative beta", lambda f: f.train("--beta", "-0.1"), "beta must be >= 0"),
    row("beta nan", lambda f: f.train("--beta", "nan"), "beta must be finite"),
    row("kl-horizon 0", lambda f: f.train("--kl-horizon", "0"), "kl_horizon must be >= 1"),
    row("max-new-tokens 10^9", lambda f: f.train("--max-new-tokens", "1000000000"),
        "exceeds the policy's context"),
    row("sample-responses -1", lambda f: f.train("--sample-responses", "-1"), "sample_responses must be >= 0"),
    row("dtype float64", lambda f: f.train("--dtype", "float64"), "dtype must be one of"),
    row("sampling dtype float16", lambda f: f.train("--sampling-dtype", "float16"), "sampling_dtype must be one of"),
    row("bfloat16 sampling of a bfloat16 policy", lambda f: f.train("--dtype", "bfloat16", "--sampling-dtype", "bfloat16"),
        "samples from a copy of a float32 policy"),
    row("LoRA target module not in the policy", lambda f: f.train("--lora-target-modules", "q_proj,qkv_proj"),
        "lora_target_modules qkv_proj not found in the policy"),
    row("LoRA target modules empty", lambda f: f.train("--lora-target-modules", ","), "lora_target_modules is empty"),
    row("unknown algorithm", lambda f: f.train("--algorithm", "sgd"), "algorithm must be one of"),
    row("unknown partition", lambda f: f.train("--partition", "zipf"), "partition must be one of"),
    row("unknown preset", lambda f: f.train("--preset", "huge"), "invalid choice: 'huge'"),
    row("unknown optimizer", lambda f: f.train("--optimizer", "adam"), "optimizer must be one of"),
    row("unknown report-to", lambda f: f.train("--report-to", "comet"), "report_to must be one of"),
    row("config file missing", lambda f: f.train("--config", str(f.root / "no-such-config.json")),
        lambda f: f"config file {f.root / 'no-such-config.json'} does not exist"),
    row("config file with an unknown setting", lambda f: f.train("--config", str(f.run_unknown_setting / "config.json")),
        "unknown setting(s): warp"),
    row("config file with a bad value", lambda f: f.train("--config", str(f.run_bad_setting / "config.json")),
        "beta must be >= 0"),
    row("client preference that does not sum to 1", lambda f: f.train("--client-preference", "0=0.9,0.2"),
        "client 0: node config preference '0.9,0.2': preference must sum to 1"),
    row("client preference for a client that does not exist", lambda f: f.train("--client-preference", "7=0.5,0.5"),
        "clients are 0 to"),
    row("unknown aggregator", lambda f: f.train("--aggregator", "mean"), "aggregator must be one of"),
    row("unknown reward spec", lambda f: f.train("--rewards", "civility,no-such-reward"),
        "unknown reward spec 'no-such-reward'"),
    row("one reward only", lambda f: f.train("--rewards", "civility"), "at least 2 objectives"),
    row("num-clients 0", lambda f: f.train("--num-clients", "0"), "num_clients must be >= 1"),
    row("num-rounds not a number", lambda f: f.train("--num-rounds", "two"), "num_rounds expects a int"),
    row("bool flag not a bool", lambda f: f.train("--adaptive-kl", "maybe"), "adaptive_kl expects a bool"),
    row("device gpu", lambda f: f.train("--device", "gpu"), "device must be auto, cpu, cuda or cuda:N"),
    row("temperature 0", lambda f: f.train("--temperature", "0"), "temperature must be > 0"),
    row("top-p above 1", lambda f: f.train("--top-p", "1.5"), "top_p must be in (0, 1]"),
    row("more minibatches than rollouts", lambda f: f.train("--num-minibatches", "9"),
        "num_minibatches (9) cannot exceed rollout_batch_size (8)"),
    row("min-clients above num-clients", lambda f: f.train("--min-clients", "5"), "min_clients must be between 1"),
    row("trim-fraction 0.5", lambda f: f.train("--trim-fraction", "0.5"), "trim_fraction must be < 0.5"),
    row("lora-dropout 1", lambda f: f.train("--lora-dropout", "1"), "lora_dropout must be in [0, 1)"),
    row("eval-fraction 1", lambda f: f.train("--eval-fraction", "1"), "eval_fraction must be in [0, 1)"),
    row("round-timeout 0", lambda f: f.train("--round-timeout", "0"), "round_timeout must be > 0"),
    row("unknown flag", lambda f: f.train("--num-roundz", "3"), "unrecognized arguments: --num-roundz"),
    row("flag without its value", lambda f: f.train("--num-rounds"), "argument --num-rounds: expected one argument"),
    # ---- firm train: prompts, partition, policy, reward directories ----------------------------
    row("missing prompt file", lambda f: f.train("--prompts", str(f.root / "no-such.jsonl")),
        lambda f: f"prompt source '{f.root / 'no-such.jsonl'}' is not an existing file"),
    row("empty prompt file", lambda f: f.train("--prompts", str(f.empty_prompts)),
        lambda f: f"{f.empty_prompts}: no prompts found"),
    row("malformed prompt line", lambda f: f.train("--prompts", str(f.malformed_prompts)),
        lambda f: f"{f.malformed_prompts}:3"),
    row("prompt record without a prompt field", lambda f: f.train("--prompts", str(f.no_field_prompts)),
        lambda f: f"{f.no_field_prompts}:2: record has none of the fields"),
    row("prompt field not a string", lambda f: f.train("--prompts", str(f.wrong_type_prompts)),
        lambda f: f"{f.wrong_type_prompts}:1: field 'prompt' must be a string"),
    row("blank prompt", lambda f: f.train("--prompts", str(f.blank_prompts)), "empty prompt"),
    row("prompt source is a folder", lambda f: f.train("--prompts", str(f.root / "prompts")), "is not an existing file"),
    row("too many clients for the prompts",
        lambda f: f.train("--prompts", str(f.three_prompts), "--eval-fraction", "0", "--num-clients", "5"),
        "cannot split 3 prompts into 5 partitions"),
    row("category partition with 1 client", lambda f: f.train("--partition", "category", "--num-clients", "1"),
        "the category partition gives every client one of the 2 prompt groups"),
    row("missing policy directory", lambda f: f.train("--policy", str(f.root / "no-such-model")),
        lambda f: f"could not load policy '{f.root / 'no-such-model'}'"),
    row("policy directory without config.json", lambda f: f.train("--policy", str(f.policy_no_config)),
        lambda f: f"could not load policy '{f.policy_no_config}'"),
    row("policy with a corrupt config.json", lambda f: f.train("--policy", str(f.policy_corrupt_config)),
        lambda f: f"{f.policy_corrupt_config / 'config.json'}"),
    row("reward directory with a garbage config.json",
        lambda f: f.train("--rewards", f"civility,{f.reward_garbage_config}"),
        lambda f: f"{f.reward_garbage_config / 'config.json'}"),
    row("reward directory whose config.json is a list",
        lambda f: f.train("--rewards", f"civility,{f.reward_config_list}"),
        lambda f: f"{f.reward_config_list / 'config.json'}"),
    row("reward directory with a garbage firm_reward.json",
        lambda f: f.train("--rewards", f"civility,{f.reward_garbage_descriptor}"),
        lambda f: f"{f.reward_garbage_descriptor / 'firm_reward.json'}: the descriptor of reward"),
    row("reward directory with a foreign firm_reward.json",
        lambda f: f.train("--rewards", f"civility,{f.reward_wrong_descriptor}"),
        lambda f: f"{f.reward_wrong_descriptor / 'firm_reward.json'}: expected format"),
    row("reward directory with neither file", lambda f: f.train("--rewards", f"civility,{f.reward_empty_dir}"),
        "has neither firm_reward.json nor config.json"),
    row("reward spec names a file", lambda f: f.train("--rewards", f"civility,{f.a_file}"),
        "is a file; a reward model is a directory"),
    # ---- firm train: run directories -----------------------------------------------------------
    row("run-dir under a regular file", lambda f: f.train("--run-dir", str(f.a_file / "run")),
        lambda f: f"run directory {f.a_file / 'run'}"),
    row("run-dir is a regular file", lambda f: f.train("--run-dir", str(f.a_file)),
        lambda f: f"run directory {f.a_file}"),
    row("run-dir holds a run (left untouched)", lambda f: f.train("--run-dir", str(f.existing_run)),
        "already holds a run"),
    row("resume a missing run", lambda f: ["train", "--resume", str(f.root / "no-such-run")], "does not exist"),
    row("resume a folder without state.json", lambda f: ["train", "--resume", str(f.run_no_state)],
        "state.json is missing"),
    row("resume with state.json {}", lambda f: ["train", "--resume", str(f.run_state_object)],
        lambda f: f"{f.run_state_object / 'state.json'}"),
    row("resume with state.json []", lambda f: ["train", "--resume", str(f.run_state_list)],
        lambda f: f"{f.run_state_list / 'state.json'}"),
    row("resume with a non-integer completed_rounds", lambda f: ["train", "--resume", str(f.run_state_text)],
        lambda f: f"{f.run_state_text / 'state.json'}"),
    row("resume with a torn state.json", lambda f: ["train", "--resume", str(f.run_state_garbage)],
        lambda f: f"{f.run_state_garbage / 'state.json'} is corrupt"),
    row("resume with a corrupt config.json", lambda f: ["train", "--resume", str(f.run_corrupt_config)],
        lambda f: f"{f.run_corrupt_config / 'config.json'}: not valid JSON"),
    row("resume with config.json a list", lambda f: ["train", "--resume", str(f.run_config_list)],
        lambda f: f"{f.run_config_list / 'config.json'}: expected a JSON object"),
    row("resume with an unknown setting", lambda f: ["train", "--resume", str(f.run_unknown_setting)],
        "unknown setting(s): warp"),
    row("resume with an invalid setting", lambda f: ["train", "--resume", str(f.run_bad_setting)],
        lambda f: f"{f.run_bad_setting / 'config.json'}: beta must be >= 0"),
    row("resume changing a setting", lambda f: ["train", "--resume", str(f.existing_run), "--beta", "0.5"],
        "only --num-rounds may change"),
    row("resume with --num-rounds 0", lambda f: ["train", "--resume", str(f.existing_run), "--num-rounds", "0"],
        "num_rounds must be >= 1"),
    # ---- the bad inputs that were not clean (tracebacks, silent acceptance, a resume that trained on) ----
    row("device index beyond any integer", lambda f: f.train("--device", "cuda:99999999999999999999"),
        "device must be auto, cpu, cuda or cuda:N"),
    row("partition-seed -1", lambda f: f.train("--partition-seed", "-1"), "partition_seed must be from 0 to 2^32 - 1"),
    row("seed 10^30", lambda f: f.train("--seed", str(10**30)), "seed is out of range"),
    row("seed 2^40", lambda f: f.train("--seed", str(2**40)), "seed must be from 0 to 2^32 - 1"),
    row("run-dir name of 300 characters", lambda f: f.train("--run-dir", str(f.root / ("r" * 300))),
        "is longer than the file system allows"),
    row("the same reward twice", lambda f: f.train("--rewards", "relevance,relevance"),
        "rewards names relevance more than once"),
    row("policy whose weights are a pickle", lambda f: f.train("--policy", str(f.pickled_policy)),
        "its weights are pickle files (pytorch_model.bin)"),
    row("resume: config.json num_rounds true", lambda f: ["train", "--resume", str(f.run_bool_rounds)],
        "num_rounds expects a int, got True"),
    row("resume: config.json policy a number", lambda f: ["train", "--resume", str(f.run_number_policy)],
        "policy expects a str, got 5"),
    row("resume with --preset", lambda f: ["train", "--resume", str(f.existing_run), "--preset", "paper"],
        "--preset paper cannot be combined with --resume"),
    row("resume after the objectives were swapped in config.json", lambda f: ["train", "--resume", str(f.run_swapped)],
        "the objectives are ['civility', 'relevance'] but the run's rounds were trained on ['relevance', 'civility']"),
    row("resume after the algorithm was changed in config.json",
        lambda f: ["train", "--resume", str(f.run_other_algorithm)],
        "algorithm is 'mgda' but the run's rounds were trained with 'firm'"),
    row("resume after prompts points to a missing file", lambda f: ["train", "--resume", str(f.run_missing_prompts)],
        "is not an existing file"),
    # ---- firm eval -----------------------------------------------------------------------------
    row("eval: adapter folder without adapter_config.json", lambda f: f.eval("--adapter", str(f.root / "prompts")),
        "adapter_config.json missing"),
    row("eval: corrupt adapter_config.json", lambda f: f.eval("--adapter", str(f.adapter_corrupt_config)),
        lambda f: f"{f.adapter_corrupt_config / 'adapter_config.json'}: the adapter config is not valid JSON"),
    row("eval: adapter_config.json a list", lambda f: f.eval("--adapter", str(f.adapter_config_list)),
        lambda f: f"{f.adapter_config_list / 'adapter_config.json'}"),
    row("eval: truncated adapter safetensors", lambda f: f.eval("--adapter", str(f.adapter_truncated)),
        lambda f: f"{f.adapter_truncated / 'adapter_model.safetensors'}"),
    row("eval: adapter without weights", lambda f: f.eval("--adapter", str(f.adapter_no_weights)),
        "adapter_model.safetensors"),
    row("eval: adapter whose base model is missing",
        lambda f: ["eval", *REWARDS, "--adapter", str(f.adapter_missing_base)],
        lambda f: f"could not load policy '{f.root / 'no-such-base'}'"),
    row("eval: --json under a regular file", lambda f: f.eval("--json", str(f.a_file / "out.json")),
        lambda f: f"--json {f.a_file / 'out.json'}: cannot write there"),
    row("eval: --json is a folder", lambda f: f.eval("--json", str(f.root)), "cannot write there"),
    row("eval: unknown split", lambda f: f.eval("--split", "train"), "split must be one of"),
    row("eval: num-prompts 0", lambda f: f.eval("--num-prompts", "0"), "num_prompts must be >= 1"),
    row("eval: samples-per-prompt 0", lambda f: f.eval("--samples-per-prompt", "0"),
        "samples_per_prompt must be >= 1"),
    row("eval: show-samples -1", lambda f: f.eval("--show-samples", "-1"), "show_samples must be >= 0"),
    row("eval: temperature 0", lambda f: f.eval("--temperature", "0"), "temperature must be > 0"),
    row("eval: max-new-tokens 10^9", lambda f: f.eval("--max-new-tokens", "1000000000"),
        "exceeds the policy's context"),
    row("eval: one reward", lambda f: ["eval", "--policy", f.policy, "--rewards", "civility"],
        "at least 2 objectives"),
    row("eval: unknown reward spec", lambda f: ["eval", "--policy", f.policy, "--rewards", "civility,nope"],
        "unknown reward spec 'nope'"),
    row("eval: missing prompt file", lambda f: f.eval("--prompts", str(f.root / "no-such.jsonl")),
        "is not an existing file"),
    row("eval: eval split empty", lambda f: f.eval("--eval-fraction", "0"), "split 'eval' is empty"),
    # ---- firm reward fit / eval ----------------------------------------------------------------
    row("reward fit: missing pair file",
        lambda f: ["reward", "fit", "--data", str(f.root / "no-pairs.jsonl"), "--out", str(f.root / "fitted")],
        "no such pair file"),
    row("reward fit: pair without 'rejected'",
        lambda f: ["reward", "fit", "--data", str(f.pairs_missing_key), "--out", str(f.root / "fitted")],
        lambda f: f"{f.pairs_missing_key}:2: missing key 'rejected'"),
    row("reward fit: pair line not JSON",
        lambda f: ["reward", "fit", "--data", str(f.pairs_not_json), "--out", str(f.root / "fitted")],
        lambda f: f"{f.pairs_not_json}:2"),
    row("reward fit: empty pair file",
        lambda f: ["reward", "fit", "--data", str(f.pairs_empty), "--out", str(f.root / "fitted")],
        "no preference pairs in the file"),
    row("reward fit: test-fraction 1.5",
        lambda f: ["reward", "fit", "--data", str(f.good_pairs), "--out", str(f.root / "fitted"),
                   "--test-fraction", "1.5"], "test fraction must be in [0, 1)"),
    row("reward fit: threads 0",
        lambda f: ["reward", "fit", "--data", str(f.good_pairs), "--out", str(f.root / "fitted"), "--threads", "0"],
        "--threads must be at least 1"),
    row("reward fit: unknown head",
        lambda f: ["reward", "fit", "--data", str(f.good_pairs), "--out", str(f.root / "fitted"), "--head", "mlp"],
        "unknown head 'mlp'"),
    row("reward fit: --out under a regular file",
        lambda f: ["reward", "fit", "--data", str(f.good_pairs), "--out", str(f.a_file / "fitted")],
        lambda f: f"--out {f.a_file / 'fitted'}"),
    row("reward eval: pair without 'rejected'",
        lambda f: ["reward", "eval", "--model", "civility", "--data", str(f.pairs_missing_key)],
        lambda f: f"{f.pairs_missing_key}:2: missing key 'rejected'"),
    row("reward eval: unknown model spec",
        lambda f: ["reward", "eval", "--model", "no-such-reward", "--data", str(f.good_pairs)],
        "unknown reward spec 'no-such-reward'"),
    row("reward eval: garbage config.json",
        lambda f: ["reward", "eval", "--model", str(f.reward_garbage_config), "--data", str(f.good_pairs)],
        lambda f: f"{f.reward_garbage_config / 'config.json'}"),
    row("reward eval: garbage firm_reward.json",
        lambda f: ["reward", "eval", "--model", str(f.reward_garbage_descriptor), "--data", str(f.good_pairs)],
        lambda f: f"{f.reward_garbage_descriptor / 'firm_reward.json'}: the descriptor of reward"),
    row("reward eval: unknown split",
        lambda f: ["reward", "eval", "--model", "civility", "--data", str(f.good_pairs), "--split", "dev"],
        "invalid choice: 'dev'"),
    row("reward eval: bootstrap 0",
        lambda f: ["reward", "eval", "--model", "civility", "--data", str(f.good_pairs), "--bootstrap", "0"],
        "--bootstrap must be at least 1"),
    row("reward eval: batch-size 0",
        lambda f: ["reward", "eval", "--model", "civility", "--data", str(f.good_pairs), "--batch-size", "0"],
        "--batch-size must be at least 1"),
    row("reward eval: limit 0",
        lambda f: ["reward", "eval", "--model", "civility", "--data", str(f.good_pairs), "--limit", "0"],
        "--limit must be at least 1"),
    # ---- firm synthetic ------------------------------------------------------------------------
    row("synthetic: seeds 1", lambda f: ["synthetic", "--out", str(f.root / "syn"), "--seeds", "1"],
        "seeds must be >= 2"),
    row("synthetic: conflict angle 180", lambda f: ["synthetic", "--out", str(f.root / "syn"),
                                                    "--conflict-angle", "180"], "conflict_angle must be in (0, 180)"),
    row("synthetic: negative noise", lambda f: ["synthetic", "--out", str(f.root / "syn"), "--noise", "-1"],
        "noise must be >= 0"),
    row("synthetic: unknown algorithm", lambda f: ["synthetic", "--out", str(f.root / "syn"),
                                                   "--algorithms", "firm,adam"], "algorithms: unknown 'adam'"),
    row("synthetic: preference not summing to 1", lambda f: ["synthetic", "--out", str(f.root / "syn"),
                                                             "--preference", "0.5,0.6"], "preference must sum to 1"),
    row("synthetic: --out is a file", lambda f: ["synthetic", "--out", str(f.a_file), "--seeds", "2"],
        "exists and is not a folder"),
    row("synthetic: --out under a regular file", lambda f: ["synthetic", "--out", str(f.a_file / "syn")],
        lambda f: f"--out {f.a_file / 'syn'}"),
    # ---- firm compare / pareto -----------------------------------------------------------------
    row("compare: unknown algorithm", lambda f: ["compare", "--out", str(f.root / "exp"), "--algorithms", "firm,ppo"],
        "unknown algorithms: ppo"),
    row("compare: unknown partition", lambda f: ["compare", "--out", str(f.root / "exp"), "--partitions", "zipf"],
        "unknown partitions: zipf"),
    row("compare: seeds not integers", lambda f: ["compare", "--out", str(f.root / "exp"), "--seeds", "0,x"],
        "--seeds must be comma-separated integers"),
    row("compare: eval-prompts -1", lambda f: ["compare", "--out", str(f.root / "exp"), "--eval-prompts", "-1"],
        "--eval-prompts must be >= 0"),
    row("compare: eval-samples 0", lambda f: ["compare", "--out", str(f.root / "exp"), "--eval-samples", "0"],
        "--eval-samples must be >= 1"),
    row("compare: harness-owned flag after --",
        lambda f: ["compare", "--out", str(f.root / "exp"), "--", "--seed", "3"], "--seed after -- is set by the harness"),
    row("compare: unknown train flag after --",
        lambda f: ["compare", "--out", str(f.root / "exp"), "--", "--num-roundz", "3"],
        "unrecognized arguments: --num-roundz"),
    row("compare: bad train setting after --",
        lambda f: ["compare", "--out", str(f.root / "exp"), "--", *REWARDS, "--kl-horizon", "0"],
        "kl_horizon must be >= 1"),
    row("compare: --out under a regular file",
        lambda f: ["compare", "--out", str(f.a_file / "exp"), "--dry-run", "--", *REWARDS],
        lambda f: f"--out {f.a_file / 'exp'}"),
    row("pareto: preferences not summing to 1",
        lambda f: ["pareto", "--out", str(f.root / "exp"), "--preferences", "0.5,0.6;0.2,0.8", "--", *REWARDS],
        "must sum to 1"),
    row("pareto: negative beta", lambda f: ["pareto", "--out", str(f.root / "exp"), "--betas", "-1", "--", *REWARDS],
        "--betas: beta must be >= 0, got -1.0"),
    row("pareto: reference point of the wrong length",
        lambda f: ["pareto", "--out", str(f.root / "exp"), "--reference-point", "1,2,3", "--", *REWARDS],
        "--reference-point has 3 values but there are 2 objectives"),
    row("pareto: unknown partition", lambda f: ["pareto", "--out", str(f.root / "exp"), "--partition", "zipf"],
        "invalid choice: 'zipf'"),
    row("pareto: one preference vector",
        lambda f: ["pareto", "--out", str(f.root / "exp"), "--preferences", "0.5,0.5", "--", *REWARDS],
        "needs at least 2 vectors"),
]


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file and folder under the roots (files with their bytes)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


@pytest.fixture
def files(tmp_path: Path, tiny_policy_dir: str) -> Files:
    return Files(tmp_path, tiny_policy_dir)


def test_the_table_is_large_enough():
    assert len(BAD_INPUTS) >= 60


def test_a_model_cache_under_a_file_is_refused_before_the_policy_is_converted(files, monkeypatch, capsys):
    import firm.models as models

    def forbidden(*args, **kwargs):
        raise AssertionError("the embedded policy was converted before the cache was checked")

    monkeypatch.setattr(models, "_materialize_embedded_policy", forbidden)
    monkeypatch.setenv("FIRM_CACHE", str(files.a_file / "cache"))
    before = snapshot(files.root)
    assert main(["train", "--policy", "embedded", *REWARDS, "--run-dir", str(files.run)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: the model cache (FIRM_CACHE) {files.a_file / 'cache'}: cannot create a folder there " \
                  f"({files.a_file} is a file)\n"
    assert snapshot(files.root) == before


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv: Row, message, files: Files, tiny_policy_dir,
                                                            capsys, monkeypatch):
    # Fail fast: nothing may start Flower's simulation (Ray) or load a model's weights.
    import firm.federation.simulation as simulation

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad input got past the checks (to the simulation, a model load or a run)")

    monkeypatch.setattr(simulation, "flwr_run_simulation", forbidden)
    import firm.cli.experiments as experiments_cli
    import firm.evaluate as evaluate
    import firm.rewards.pipeline as pipeline
    import firm.synthetic.grid as grid

    for module, name in ((evaluate, "load_policy"), (evaluate, "build_rewards"), (pipeline, "fit_reward_model"),
                         (grid, "run_configuration"), (experiments_cli, "run_compare"),
                         (experiments_cli, "run_pareto")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.chdir(files.root)  # a default runs/ folder would land here, and be seen
    expected = message(files) if callable(message) else message
    before = snapshot(files.root, Path(tiny_policy_dir))
    capsys.readouterr()
    started = time.perf_counter()
    code = main(argv(files))
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err
    assert expected in err, err
    assert snapshot(files.root, Path(tiny_policy_dir)) == before, "a bad input changed a file"
    assert not files.run.exists()
    assert elapsed < 60, f"took {elapsed:.0f} s: the check comes too late"
