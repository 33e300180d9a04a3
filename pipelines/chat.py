"""Plain-text views of a message list. Dependency-free on purpose: the RM library (`pipelines.rm`) imports it, and
that library must load where only torch + transformers are installed (GPU images, torchrun workers)."""

from __future__ import annotations


def prompt_text(history: list[dict[str, str]]) -> str:
    """The conversation as plain text (used for embeddings, decontamination, encoders and display)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in history)


def first_user_turn(history: list[dict[str, str]]) -> str:
    for m in history:
        if m["role"] == "user":
            return m["content"]
    return ""
