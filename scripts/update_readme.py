"""Regenerate the README's configuration table from firm.config (the one source of truth)."""

from pathlib import Path

from firm.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

text = README.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
README.write_text(head + START + config_reference_markdown() + END + tail)
print(f"updated {README}")
