"""LLMResource: which engine labels and judges (backend + models + sampling). Secrets stay in the environment."""

import dagster as dg
from pydantic import Field, PrivateAttr

from pipelines.annotate.backends import Backend, make_backend


class LLMResource(dg.ConfigurableResource):
    backend: str = Field(default="simulated", description="simulated | vllm | openai | transformers")
    models: list[str] = Field(default_factory=lambda: ["simulated-judge-a", "simulated-judge-b"],
                              description="Judge ensemble (model ids); the first also writes the attributes")
    base_url: str = Field(default="", description="openai backend: server URL, e.g. http://gpu-1:8000/v1")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="openai backend: env var holding the key")
    concurrency: int = Field(default=16, description="openai backend: requests in flight")
    gpu_memory_utilization: float = Field(default=0.85, description="vllm backend")
    max_model_len: int = Field(default=8192, description="vllm backend")
    samples: int = Field(default=3, description="Self-consistency samples per model and pair")
    temperature: float = Field(default=0.7, description="Sampling temperature for judging")
    commit_pairs: int = Field(default=256, description="Pairs per Delta commit of LLM verdicts (seed, Stage 1, "
                                                       "Stage 2) and of Stage-2 attributes: what a crash can lose")
    simulated_accuracy: float = Field(default=0.85, description="simulated backend: P(verdict follows the truth)")
    simulated_position_bias: float = Field(default=0.6, description="simulated backend: P(Candidate 1) when wrong")

    _backends: list | None = PrivateAttr(default=None)

    def backends(self) -> list[Backend]:
        """The judges, built once per resource instance: `annotator()` is the first of them, so a step that both
        annotates and judges loads an in-process vLLM engine once, not twice."""
        if self._backends is None:
            self._backends = self._build()
        return self._backends

    def _build(self) -> list[Backend]:
        out = []
        for i, m in enumerate(self.models):
            if self.backend == "simulated":
                out.append(make_backend("simulated", name=m, accuracy=self.simulated_accuracy - 0.05 * i,
                                        position_bias=self.simulated_position_bias))
            elif self.backend == "openai":
                out.append(make_backend("openai", base_url=self.base_url, model=m, api_key_env=self.api_key_env,
                                        concurrency=self.concurrency))
            elif self.backend == "vllm":
                out.append(make_backend("vllm", model=m, gpu_memory_utilization=self.gpu_memory_utilization,
                                        max_model_len=self.max_model_len))
            else:
                out.append(make_backend(self.backend, model=m))
        return out

    def annotator(self) -> Backend:
        return self.backends()[0]
