"""The ``evomerge moe`` config: mergekit-moe's YAML, validated once.

Same keys as mergekit-moe 0.1.5 (``base_model``, ``experts``, ``gate_mode``, ``dtype``,
``experts_per_token``, ``shared_experts``, ``architecture``), plus two of evomerge's: ``seed``
(random gates and expert noise) and ``storage`` (where ``study:NAME`` experts live; default
``sqlite:///runs/NAME.db`` beside the config). A ``source_model`` may be ``study:NAME`` (the
study's best trial) or ``study:NAME#N`` (trial N), built in memory from its recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.configfile import YamlConfig
from evomerge.errors import ConfigError
from evomerge.moe_gates import PROMPT_MODES

__all__ = ["ExpertConfig", "MoEConfig", "STUDY_PREFIX"]

STUDY_PREFIX = "study:"


class ExpertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None  # gaussian noise added to this expert's MLP weights (drawn from `seed`)
    residual_scale: float | None = None  # multiplies this expert's down projection

    def prompts(self) -> tuple[list[str], list[str]]:
        return list(self.positive_prompts or []), list(self.negative_prompts or [])


class MoEConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str
    experts: list[ExpertConfig] = Field(min_length=1)
    gate_mode: Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"] = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertConfig] | None = None
    architecture: str | None = None  # output architecture name prefix: mixtral, qwen, qwen3
    seed: int = 0
    storage: str | None = None
    root: Path = Path(".")

    def after_validate(self) -> None:
        n = len(self.experts)
        if not 1 <= self.experts_per_token <= n:
            raise ConfigError(f"experts_per_token: expected 1 to {n} (the number of experts), "
                              f"got {self.experts_per_token}")
        if self.gate_mode in PROMPT_MODES:
            for kind, group in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
                for i, e in enumerate(group):
                    if not e.positive_prompts:
                        raise ConfigError(f"{kind}[{i}].positive_prompts: gate_mode {self.gate_mode} needs at "
                                          "least one prompt per expert")
            if n > 1 and all(e.prompts() == self.experts[0].prompts() for e in self.experts[1:]):
                raise ConfigError("experts: every expert has the same prompts, so the router cannot tell them "
                                  "apart; give each expert prompts for what it should receive")

    def study_storage(self, study: str) -> str:
        """The storage URL of ``study:NAME`` experts."""
        return self.storage or f"sqlite:///{(self.root / 'runs' / (study + '.db')).resolve()}"

    def all_experts(self) -> list[ExpertConfig]:
        """Routed experts, then shared ones (the order of the gate vectors)."""
        return [*self.experts, *(self.shared_experts or [])]
