"""The closed vocabularies and JSON schemas of LLM annotation (paper §3.2: five preference attributes).

task_category   : what the user asks for (closed list below; "other" when none fits)
objectivity     : objective (a checkable right answer) | subjective (taste, values)
controversiality: low | medium | high (how much reasonable annotators would disagree)
desired_attributes: what a user would want in a good response (short phrases)
guideline       : instance-specific criteria for deciding which response is better
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

TASK_CATEGORIES = (
    "math",  # arithmetic, algebra, word problems with a numeric answer
    "coding",  # writing, fixing or explaining code
    "factual_qa",  # questions with a verifiable factual answer
    "reasoning",  # logic puzzles, multi-step inference without heavy math
    "instruction_following",  # formatting/constraint-following tasks (sort, upper-case, count, length limits)
    "creative_writing",  # stories, poems, slogans
    "advice",  # personal, health, career, practical advice
    "safety",  # requests for harmful, illegal or dangerous help
    "chitchat",  # open conversation, greetings, opinions
    "other",
)

Objectivity = Literal["objective", "subjective"]
Controversiality = Literal["low", "medium", "high"]


class Attributes(BaseModel):
    task_category: Literal[TASK_CATEGORIES]  # type: ignore[valid-type]
    objectivity: Objectivity
    controversiality: Controversiality
    desired_attributes: list[Annotated[str, StringConstraints(min_length=1, max_length=80)]] = Field(
        min_length=1, max_length=8)
    guideline: str = Field(min_length=10, max_length=800)


class Verdict(BaseModel):
    verdict: Literal["1", "2", "undecidable"]
    rationale: str = Field(max_length=300)


class PreCheck(BaseModel):
    """Batched pre-verification of ONE response (paper §3.2/D.2): shown to annotators of objective pairs."""

    verdict: Literal["correct", "incorrect", "unsure"]
    reason: str = Field(max_length=300)


ATTRIBUTES_JSON_SCHEMA = Attributes.model_json_schema()
PRECHECK_JSON_SCHEMA = PreCheck.model_json_schema()
VERDICT_JSON_SCHEMA = Verdict.model_json_schema()
