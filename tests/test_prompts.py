"""Prompt loading: the embedded set, HH-RLHF / AlpacaEval formats, and clear errors on bad input."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from firm.hh import HHFormatError, parse_hh_transcript
from firm.prompts import (
    Prompt,
    PromptFormatError,
    load_embedded_prompts,
    load_prompts,
)

SHARED_DATA = Path(os.environ.get("FIRM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
HH_HARMLESS = SHARED_DATA / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"
ALPACA_PAIRS = SHARED_DATA / "alpaca-eval" / "gpt4-pairs-a.jsonl.gz"
ALPACA_INSTRUCTIONS = SHARED_DATA / "alpaca-eval" / "instructions-a.json"

TWO_TURN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What's 2+2?\n\nAssistant:"
TWO_TURN_MESSAGES = (("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "What's 2+2?"))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (set FIRM_SHARED_DATA to the shared/data folder)")


# --- the embedded set -----------------------------------------------------------------------


def embedded_records() -> list[dict]:
    text = importlib.resources.files("firm").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def test_embedded_set_is_large_balanced_and_loads():
    prompts = load_prompts("embedded")
    assert prompts == load_embedded_prompts()
    assert len(prompts) >= 250
    shares = {group: count / len(prompts) for group, count in Counter(p.group for p in prompts).items()}
    assert set(shares) == {"ordinary", "decline"}
    assert min(shares.values()) >= 0.35, shares
    assert all(len(p.messages) == 1 and p.messages[0][0] == "user" for p in prompts)


def test_embedded_file_has_no_duplicates_and_well_formed_records():
    records = embedded_records()
    assert len(records) == len(load_embedded_prompts()), "the loader must not have dropped duplicates"
    normalized = [re.sub(r"\s+", " ", r["prompt"]).strip().lower() for r in records]
    duplicates = [text for text, count in Counter(normalized).items() if count > 1]
    assert not duplicates, duplicates
    for record in records:
        assert set(record) == {"prompt", "category"}, record
        assert re.fullmatch(r"(ordinary|decline)/[a-z-]+", record["category"]), record
        assert 3 <= len(record["prompt"].split()) <= 60, record
    subcategories = Counter(r["category"] for r in records)
    assert sum(c.startswith("ordinary/") for c in subcategories) >= 8
    assert sum(c.startswith("decline/") for c in subcategories) >= 8


# --- HH-RLHF transcripts --------------------------------------------------------------------


def test_parse_hh_transcript_two_turns_and_round_trip():
    assert parse_hh_transcript(TWO_TURN) == TWO_TURN_MESSAGES
    prompt = Prompt(messages=TWO_TURN_MESSAGES, category="hh")
    assert prompt.hh_text() == TWO_TURN
    assert prompt.text == "What's 2+2?"
    assert prompt.chat_messages() == [{"role": r, "content": c} for r, c in TWO_TURN_MESSAGES]


def test_parse_hh_transcript_keeps_a_final_assistant_reply():
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello") == (("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize("bad", ["Human: hi\n\nAssistant:", "\n\nHuman: hi there", "hello"])
def test_parse_hh_transcript_rejects_non_transcripts(bad):
    with pytest.raises(HHFormatError, match="HH transcript"):
        parse_hh_transcript(bad)


def test_hh_pair_prompt_is_chosen_up_to_its_last_assistant(tmp_path):
    record = {"chosen": TWO_TURN + " It is 4.", "rejected": TWO_TURN + " Five."}
    prompts = load_prompts(str(write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(record)])))
    assert prompts == [Prompt(messages=TWO_TURN_MESSAGES, category="hh")]


def test_prompt_field_holding_an_hh_transcript_is_parsed(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": TWO_TURN, "chosen": "4", "rejected": "5"})])
    assert load_prompts(str(path))[0].messages == TWO_TURN_MESSAGES


def test_prompt_must_end_with_a_user_turn():
    with pytest.raises(PromptFormatError, match="last message must come from the user"):
        Prompt(messages=(("user", "hi"), ("assistant", "hello")), category="hh")
    with pytest.raises(PromptFormatError, match="role"):
        Prompt(messages=(("system", "be nice"), ("user", "hi")), category="x")


# --- the shared real data -------------------------------------------------------------------


def test_loads_hh_rlhf_harmless_file():
    needs(HH_HARMLESS)
    prompts = load_prompts(str(HH_HARMLESS))
    assert 1000 <= len(prompts) <= 1156
    assert all(p.messages[-1][0] == "user" and p.text for p in prompts)
    assert all(p.category == "hh" for p in prompts)
    assert any(len(p.messages) >= 3 for p in prompts), "HH-RLHF has multi-turn prompts"
    assert all(parse_hh_transcript(p.hh_text()) == p.messages for p in prompts)


def test_loads_alpaca_pairs_deduplicated():
    needs(ALPACA_PAIRS)
    prompts = load_prompts(str(ALPACA_PAIRS))
    assert len(prompts) == 537
    assert len({p.messages for p in prompts}) == 537
    assert {p.group for p in prompts} == {"instruction"}
    assert "instruction/oasst" in {p.category for p in prompts}


def test_loads_alpaca_instruction_list():
    needs(ALPACA_INSTRUCTIONS)
    prompts = load_prompts(str(ALPACA_INSTRUCTIONS))
    assert len(prompts) == 537
    if ALPACA_PAIRS.exists():
        assert {p.text for p in prompts} == {p.text for p in load_prompts(str(ALPACA_PAIRS))}


# --- record formats -------------------------------------------------------------------------


def test_instruction_input_subset_category_and_dedup(tmp_path):
    path = write_jsonl(tmp_path / "inst.jsonl", [
        json.dumps({"instruction": "Translate to French.", "input": "Good morning", "subset": "koala"}),
        json.dumps({"instruction": "Name a colour."}),
        json.dumps({"prompt": "Name a colour.", "category": "ordinary/art"}),  # same messages: dropped
        json.dumps({"prompt": "Say hi.", "category": "ordinary/chat", "subset": "ignored"}),
    ])
    prompts = load_prompts(str(path))
    assert [(p.text, p.category) for p in prompts] == [
        ("Translate to French.\n\nGood morning", "instruction/koala"),
        ("Name a colour.", "instruction"),
        ("Say hi.", "ordinary/chat"),
    ]


def test_reads_gzip_jsonl_and_json(tmp_path):
    records = [{"prompt": "one"}, {"prompt": "two"}]
    jsonl_gz = tmp_path / "p.jsonl.gz"
    with gzip.open(jsonl_gz, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in records) + "\n")
    json_gz = tmp_path / "p.json.gz"
    with gzip.open(json_gz, "wt", encoding="utf-8") as handle:
        json.dump(records, handle)
    for path in (jsonl_gz, json_gz):
        assert [p.text for p in load_prompts(str(path))] == ["one", "two"]


def test_json_file_with_a_single_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "Only me."}), encoding="utf-8")
    assert [p.text for p in load_prompts(str(path))] == ["Only me."]


# --- errors ---------------------------------------------------------------------------------


def assert_format_error(path: Path, line: int, fragment: str) -> None:
    with pytest.raises(PromptFormatError) as caught:
        load_prompts(str(path))
    message = str(caught.value)
    assert f"{path.name}:{line}:" in message, message
    assert fragment in message, message


def test_bad_json_on_line_3(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c"'])
    assert_format_error(path, 3, "invalid JSON")


def test_missing_fields_on_line_2(tmp_path):
    path = write_jsonl(tmp_path / "fields.jsonl", ['{"prompt": "a"}', '{"question": "b"}'])
    assert_format_error(path, 2, "none of the fields")


def test_empty_prompt(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ['{"prompt": "a"}', "", '{"prompt": "   "}'])
    assert_format_error(path, 3, "empty prompt")


def test_record_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ['{"prompt": "a"}', '["not", "an", "object"]'])
    assert_format_error(path, 2, "expected a JSON object")


def test_hh_pair_without_markers(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [json.dumps({"chosen": "just a reply", "rejected": "other"})])
    assert_format_error(path, 1, "Assistant")


def test_json_list_error_points_at_the_records_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"instruction": "ok"},\n  {"instruction": "fine"},\n  {"instruction": ""}\n]\n', encoding="utf-8")
    assert_format_error(path, 4, "empty prompt")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "ok"},\n  {"instruction": }\n]\n', encoding="utf-8")
    assert_format_error(broken, 3, "invalid JSON")


def test_empty_file_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "nothing.jsonl", [""])
    with pytest.raises(PromptFormatError, match="nothing.jsonl: no prompts found"):
        load_prompts(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(PromptFormatError, match="unsupported file type"):
        load_prompts(str(path))


def test_missing_file_names_path_and_accepted_forms(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as caught:
        load_prompts(str(missing))
    assert str(missing) in str(caught.value)
    assert "embedded" in str(caught.value) and "hf:" in str(caught.value)


def test_hub_source_offline_says_so(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read these variables at import time, so the flags are patched too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="Hugging Face Hub") as caught:
        load_prompts("hf:Anthropic/hh-rlhf:test")
    assert "local" in str(caught.value)


def test_hub_source_without_a_name():
    with pytest.raises(ValueError, match="names no dataset"):
        load_prompts("hf:")


# --- limit ----------------------------------------------------------------------------------


def test_limit_is_a_deterministic_seeded_subset():
    everything = load_prompts("embedded")
    first = load_prompts("embedded", limit=20, seed=3)
    assert len(first) == 20
    assert first == load_prompts("embedded", limit=20, seed=3)
    assert first != load_prompts("embedded", limit=20, seed=4)
    positions = [everything.index(p) for p in first]
    assert positions == sorted(positions), "the subset keeps source order"


@pytest.mark.parametrize("limit", [0, 100_000])
def test_limit_out_of_range(limit):
    with pytest.raises(ValueError, match="limit"):
        load_prompts("embedded", limit=limit)
