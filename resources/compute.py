"""RayResource: where the heavy maps (RM scoring, embedding) run. Built on dagster-ray's `RayResource`, which
owns the lifecycle (ray.init when a step starts, disconnect when it ends): a local Ray started for the step on the
embedded default, or an existing cluster attached by address (`ray start --head` on a node, or a KubeRay head)."""

import os

from dagster_ray import RayResource
from pydantic import Field

from pipelines.compute import Engine, InProcessEngine, RayEngine


class ComputeResource(RayResource):
    engine: str = Field(default="ray", description="ray | inprocess (inprocess: no Ray; for one GPU or debugging)")
    address: str = Field(default="", description="'' = start a local Ray for the step; 'auto' or "
                                                 "'ray://head:10001' = attach to a running cluster")
    local_cpus: int = Field(default=0, description="CPUs of the local Ray (0 = every core); ignored with an address")
    actors: int = Field(default=0, description="Actors per model (0 = the cluster's GPUs split over the models "
                                               "scored together, e.g. 8 GPUs, 2 RMs: 4 each; one locally)")
    gpus_per_actor: float = Field(default=0.0, description="GPUs per actor (0 = CPU actors)")
    batch_rows: int = Field(default=1024, description="Pairs per Ray Data batch")
    batch_size: int = Field(default=64, description="Sequences per forward inside an actor")
    stall_timeout_s: float = Field(default=1800.0, description="A Ray pipeline that hands back no batch for this "
                                                               "long fails with what waits for what (never a hang)")
    starved_timeout_s: float = Field(default=600.0, description="...and fails after this long when its actors "
                                                                "cannot be placed or Ray reports work waiting for "
                                                                "resources the cluster lacks (an autoscaling "
                                                                "cluster's node start-up must fit in it)")

    @property
    def host(self) -> str:
        return self.address.removeprefix("ray://").split(":")[0] if "://" in self.address else "127.0.0.1"

    @property
    def ray_address(self):  # None makes ray.init start a local instance
        return self.address or None

    @property
    def name(self) -> str:
        return f"ray at {self.address}" if self.address else "local ray"

    @property
    def created(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return True

    def connect(self, context):
        if self.engine == "inprocess":
            return None
        import ray

        if ray.is_initialized():  # started by an earlier step of this process, a test or a notebook: reuse it
            return None
        opts = dict(self.ray_init_options)
        if not self.address:  # the embedded default: a local Ray on this machine, no dashboard
            opts.setdefault("num_cpus", self.local_cpus or os.cpu_count())
            opts.setdefault("include_dashboard", False)
        if os.environ.get("SYNPREF_QUIET"):  # `synpref demo` without --verbose: worker output stays in Ray's logs
            opts.setdefault("log_to_driver", False)
            opts.setdefault("logging_level", "WARNING")
            import logging

            # Ray's notice that token authentication is on (the secure default, kept on) is not a warning here
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if self.get_env_vars_to_inject():
            opts.setdefault("runtime_env", {"env_vars": self.get_env_vars_to_inject()})
        context = ray.init(address=self.ray_address, **opts)
        import logging

        # Ray Data logs a progress line per operator every few seconds; in a Dagster run log that buries the steps'
        # own lines (Stage 2 logs one per unit), so only its warnings pass
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if self.address:  # attached to a cluster: dagster-ray disconnects after the step
            self._context = context
        # a local Ray lives as long as this process: the steps of one in-process run (`synpref demo`) share it
        # instead of paying its start-up (and its actors') at every step; it stops when the process exits
        return context

    def make_engine(self, max_len: int) -> Engine:
        if self.engine == "inprocess":
            return InProcessEngine(max_len=max_len, batch_size=self.batch_size,
                                   device="cuda" if self.gpus_per_actor > 0 else "cpu")
        if self.engine != "ray":
            raise ValueError(f"engine must be ray or inprocess, not {self.engine!r}")
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() and self.gpus_per_actor > 0 else 0
        # actors = 0: the engine splits the GPUs over the models each pipeline runs (RayEngine.gpus_per_actor_pool)
        return RayEngine(actors=self.actors if (self.actors or not gpus) else 0, gpus_per_actor=self.gpus_per_actor,
                         gpus_total=gpus, batch_rows=self.batch_rows, max_len=max_len, batch_size=self.batch_size,
                         stall_timeout_s=self.stall_timeout_s, starved_timeout_s=self.starved_timeout_s)
