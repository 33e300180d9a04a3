"""LLMResource: which engine labels and judges (backend + models + sampling). A deployment sets it from the
environment (jobs/definitions.py: SYNPREF_LLM_BACKEND, SYNPREF_LLM_BASE_URL, SYNPREF_LLM_MODELS, SYNPREF_LLM_API_KEY,
... as dg.EnvVar); with no backend set, every LLM step refuses: the simulated judge answers only when chosen
(`synpref demo`, tests)."""

import dagster as dg
from pydantic import Field, PrivateAttr

from pipelines.annotate.backends import Backend, make_backend
from pipelines.annotate.cost import LLMLedger, Pricing, usage_markdown

BACKENDS = ("openai", "vllm", "transformers", "simulated")
SIMULATED_MODELS = ["simulated-judge-a", "simulated-judge-b"]


class LLMNotConfigured(ValueError):
    """This deployment has no LLM (or an incomplete one): LLM steps stop before asking anything."""


class LLMResource(dg.ConfigurableResource):
    backend: str = Field(default="", description="openai | vllm | transformers | simulated (the offline demo's "
                                                 "stand-in, chosen explicitly). '' = no LLM configured: LLM steps "
                                                 "refuse. Deployments: SYNPREF_LLM_BACKEND")
    models: list[str] = Field(default_factory=list,
                              description="Judge ensemble (model ids); the first also writes the attributes. Empty "
                                          "with backend=simulated: the two simulated judges")
    models_csv: str = Field(default="", description="The same ensemble as one comma-separated string (what an "
                                                    "environment variable can carry: SYNPREF_LLM_MODELS); when set it "
                                                    "replaces `models`")
    base_url: str = Field(default="", description="openai backend: server URL, e.g. http://gpu-1:8000/v1 "
                                                  "(SYNPREF_LLM_BASE_URL)")
    api_key: str = Field(default="", description="openai backend: the key. Set it only as "
                                                 "dg.EnvVar('SYNPREF_LLM_API_KEY'): run config and the UI then show the "
                                                 "variable's name, never its value; empty = no Authorization header")
    concurrency: int = Field(default=16, description="openai backend: requests in flight (SYNPREF_LLM_CONCURRENCY)")
    requests_per_minute: int = Field(default=0, description="openai backend: client-side request rate limit per "
                                                            "model, 0 = none (SYNPREF_LLM_RPM)")
    tokens_per_minute: int = Field(default=0, description="openai backend: client-side token rate limit per model "
                                                          "(prompt/4 + max_tokens counted before sending), 0 = none "
                                                          "(SYNPREF_LLM_TPM)")
    retry_budget_s: int = Field(default=300, description="openai backend: seconds a request may spend retrying "
                                                         "(429 + Retry-After, 5xx, timeouts) before its step stops "
                                                         "unfinished")
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

    def __repr_args__(self):  # the key never shows in a repr, a log line or an error message
        return [(k, "***" if k == "api_key" and v else v) for k, v in super().__repr_args__()]

    @property
    def model_ids(self) -> list[str]:
        """The ensemble: `models_csv` when set, else `models`; the simulated judges when simulated and none given."""
        ids = [m.strip() for m in self.models_csv.split(",") if m.strip()] if self.models_csv else list(self.models)
        return ids or (list(SIMULATED_MODELS) if self.backend == "simulated" else [])

    def check_configured(self) -> None:
        """Refuse, naming the variables to set, rather than judge with anything this deployment did not choose."""
        if not self.backend:
            raise LLMNotConfigured(
                "no LLM is configured for this deployment, so this LLM step refuses to run: set SYNPREF_LLM_BACKEND "
                "(openai, with SYNPREF_LLM_BASE_URL, SYNPREF_LLM_MODELS and SYNPREF_LLM_API_KEY; or vllm / "
                "transformers with SYNPREF_LLM_MODELS). SYNPREF_LLM_BACKEND=simulated answers from project-made "
                "data's truth: the offline demo's judge, never a real one (docs/deployment.md)")
        if self.backend not in BACKENDS:
            raise LLMNotConfigured(f"SYNPREF_LLM_BACKEND={self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not self.model_ids:
            raise LLMNotConfigured(f"backend {self.backend!r} has no models: set SYNPREF_LLM_MODELS "
                                   "(comma-separated model ids; the first also writes the attributes)")
        if self.backend == "openai" and not self.base_url:
            raise LLMNotConfigured("backend 'openai' has no server: set SYNPREF_LLM_BASE_URL "
                                   "(e.g. http://vllm:8000/v1)")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Checked when a step that uses the LLM starts, before it reads or asks anything."""
        self.check_configured()

    def _build(self) -> list[Backend]:
        self.check_configured()
        out = []
        for i, m in enumerate(self.model_ids):
            if self.backend == "simulated":
                out.append(make_backend("simulated", name=m, accuracy=self.simulated_accuracy - 0.05 * i,
                                        position_bias=self.simulated_position_bias))
            elif self.backend == "openai":
                out.append(make_backend("openai", base_url=self.base_url, model=m, api_key=self.api_key,
                                        concurrency=self.concurrency, requests_per_minute=self.requests_per_minute,
                                        tokens_per_minute=self.tokens_per_minute,
                                        retry_budget_s=float(self.retry_budget_s)))
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
