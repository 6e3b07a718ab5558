"""The Anthropic HH-RLHF text format, in one place.

HH-RLHF writes a conversation as turns ``"\\n\\nHuman: ..."`` and ``"\\n\\nAssistant: ..."``; a
prompt ends with an empty ``"\\n\\nAssistant:"``, the slot the reply fills, and a transcript
is that prompt, a space and the reply. Hub reward models trained on HH-RLHF read exactly this
text, preference files store it, and FIRM's prompts and reward models convert to and from it
here. A conversation is a sequence of (role, content) pairs with roles "user" / "assistant"
(and "system" when writing, which HH has no turn for).
"""

from __future__ import annotations

import re
from typing import Sequence

from firm.errors import FirmError

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

_ROLE_OF_SPEAKER = {"Human": USER, "Assistant": ASSISTANT}
_SPEAKER_OF_ROLE = {USER: "Human", ASSISTANT: "Assistant"}
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")

Messages = tuple[tuple[str, str], ...]


class HHFormatError(FirmError, ValueError):
    """Text that should be in the HH-RLHF format is not; the message says what is missing."""


def hh_turns(text: str) -> list[tuple[str, str]]:
    """The (role, stripped content) turns of ``text``, ignoring anything before the first marker.

    A trailing empty "\\n\\nAssistant:" is the cue for the reply to come, not a turn, so it is
    dropped. Empty turns before the last are kept (the full HH-RLHF set holds some)."""
    pieces = _TURN_MARKER.split(text)  # ["before", "Human", " a", "Assistant", " b", ...]
    turns = [(_ROLE_OF_SPEAKER[speaker], content.strip()) for speaker, content in zip(pieces[1::2], pieces[2::2])]
    if turns and turns[-1] == (ASSISTANT, ""):
        turns.pop()
    return turns


def parse_hh_transcript(text: str) -> Messages:
    """Split an HH-RLHF transcript "\\n\\nHuman: a\\n\\nAssistant: b..." into (role, content) turns.

    The transcript may end with an assistant reply or with the empty slot for one; parsing
    `render_hh(messages)` gives back ``messages``."""
    if not text.startswith(HH_HUMAN):
        raise HHFormatError(f"an HH transcript must start with {HH_HUMAN!r}, got {text[:40]!r}")
    if HH_ASSISTANT not in text:
        raise HHFormatError(f"an HH transcript must contain {HH_ASSISTANT!r}")
    return tuple(hh_turns(text))


def hh_to_messages(hh_prompt: str) -> Messages:
    """Parse an HH prompt into its turns; the conversation ends with the user message a
    policy would answer (what `Prompt.messages` holds)."""
    if _TURN_MARKER.split(hh_prompt)[0].strip():
        raise HHFormatError('an HH prompt must start with "\\n\\nHuman:"')
    turns = hh_turns(hh_prompt)
    if not turns or turns[-1][0] != USER:
        raise HHFormatError("an HH prompt must end with a human turn followed by \"\\n\\nAssistant:\"")
    return tuple(turns)


def render_hh(messages: Sequence[tuple[str, str]]) -> str:
    """The HH prompt of a user/assistant conversation ending with a user turn, contents as given:
    "\\n\\nHuman: {content}" / "\\n\\nAssistant: {content}" per turn, then "\\n\\nAssistant:"."""
    return "".join(f"\n\n{_SPEAKER_OF_ROLE[role]}: {content}" for role, content in messages) + HH_ASSISTANT


def messages_to_hh(messages: Sequence[tuple[str, str]]) -> str:
    """Write a conversation that ends with a user turn as an HH prompt, contents stripped.
    A system message is prepended to the next user turn, as HH has no system role."""
    turns: list[tuple[str, str]] = []
    pending_system = ""
    for role, content in messages:
        if role == SYSTEM:
            pending_system = f"{pending_system}{content.strip()}\n"
        elif role == USER:
            turns.append((USER, f"{pending_system}{content.strip()}"))
            pending_system = ""
        elif role == ASSISTANT:
            turns.append((ASSISTANT, content.strip()))
        else:
            raise HHFormatError(f"unknown message role {role!r} (expected system, user or assistant)")
    if not turns or turns[-1][0] != USER:
        raise HHFormatError("the conversation must end with a user message")
    return render_hh(turns)


def split_hh_transcript(transcript: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt, response) at its LAST "\\n\\nAssistant:".

    The prompt keeps the marker, so it reads exactly like the formulation hub reward models
    expect; the response is the final assistant turn without surrounding whitespace."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise HHFormatError('no "\\n\\nAssistant:" turn in the transcript')
    end = cut + len(HH_ASSISTANT)
    return transcript[:end], transcript[end:].strip()


def as_hh_prompt(text: str) -> str:
    """Return ``text`` as an HH prompt: unchanged if it already is one (starts with
    "\\n\\nHuman:"; the closing "\\n\\nAssistant:" is added if missing), otherwise wrapped as a
    single human turn."""
    if text.startswith(HH_HUMAN):
        return text if text.rstrip().endswith(HH_ASSISTANT.strip()) else text.rstrip() + HH_ASSISTANT
    return f"{HH_HUMAN} {text.strip()}{HH_ASSISTANT}"


def hh_transcript(hh_prompt: str, response: str) -> str:
    """The text an HH-trained reward model reads: the prompt, a space, the response."""
    return hh_prompt + " " + response
