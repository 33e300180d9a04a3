"""LLMResource: which engine labels and judges (backend + models + sampling). Secrets stay in the environment."""

import dagster as dg
from pydantic import Field, PrivateAttr

from pipelines.annotate.backends import Backend, make_backend
from pipelines.annotate.cost import LLMLedger, Pricing, usage_markdown


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
    usd_per_mtok: dict[str, list[float]] = Field(
        default_factory=dict, description="Hosted models' list prices: model id -> [USD per 1M input tokens, USD per "
                                          "1M output tokens]. Models not listed cost 0 (self-hosted) and are marked "
                                          "unpriced in the usage tables")
    gpu_hour_usd: float = Field(default=0.0, description="Self-hosted fleet: USD per GPU-hour; with `gpus`, the LLM "
                                                         "steps' wall time is priced (0 = not priced)")
    gpus: int = Field(default=0, description="Self-hosted fleet: GPUs serving the judges while the LLM steps run")

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

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Free the judges when the step ends: an in-process vLLM engine holds GPU memory and engine processes
        that the next step run in this process (in-process executor, tests, notebooks) would otherwise find
        taken, and an OpenAI-compatible backend holds a loop thread and open connections."""
        backends, self._backends = self._backends, None
        for b in backends or []:
            b.close()

    def pricing(self) -> Pricing:
        return Pricing(usd_per_mtok={m: (float(p[0]), float(p[1])) for m, p in self.usd_per_mtok.items()},
                       gpu_hour_usd=self.gpu_hour_usd, gpus=self.gpus)

    def usage_metadata(self, ledger: LLMLedger, **extra) -> dict:
        """Requests, tokens, failures, retries and cost of a step's LLM work, for its asset metadata."""
        pricing = self.pricing()
        return {**ledger.summary(pricing), **extra,
                "llm_usage": dg.MetadataValue.md(usage_markdown(ledger.rows(pricing)))}

    def annotator(self) -> Backend:
        return self.backends()[0]
