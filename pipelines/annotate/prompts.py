"""Versioned prompt templates: the version is the file name plus a hash of its text, so editing a prompt
invalidates cached annotations made with the old text."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def version(self) -> str:
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:8]}"

    def render(self, **kw) -> str:
        return self.text.format(**kw)


def load_prompt(name: str) -> Prompt:
    return Prompt(name, (PROMPT_DIR / f"{name}.txt").read_text())


def conversation_text(history: list[dict], limit: int = 4000) -> str:
    text = "\n".join(f"[{m['role']}] {m['content']}" for m in history)
    return text if len(text) <= limit else "…" + text[-limit:]
