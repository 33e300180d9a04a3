"""The heavy maps (RM scoring, embedding) behind one interface: in this process, or on Ray.

`RayEngine` runs them as Ray Data `map_batches` over an actor pool: each actor loads its models once (fetching a
registered RM from MLflow into the node's cache on first use) and scores record batches; one actor per GPU on a
cluster, CPU actors on the embedded default. `InProcessEngine` runs the same per-batch function here. Both return
one row per input pair, so callers (Stage 2, evaluation) cannot tell them apart except by speed; the driver alone
writes to the lake.

Ray is imported only by `RayEngine`: the in-process path needs no Ray.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.rm.registry import ModelRef

SCORE_COLUMNS = {"pair_id": pl.String, "r_chosen": pl.Float64, "r_rejected": pl.Float64, "margin": pl.Float64,
                 "p": pl.Float64, "status": pl.String, "detail": pl.String}
PAIR_INPUT = ["pair_id", "history", "chosen", "rejected"]
# Ray's CPUs are logical: what an actor or task asks for only decides where and whether it is scheduled. Stage 2
# keeps its actor pools alive for the whole run, so any CPU they hold is gone for the reads that feed them: on 2
# CPUs, two actor pools at 1.0 CPU each left the unit-read task waiting forever. Reads (a bounded Delta scan, I/O bound)
# therefore ask for no CPU, and the actors share what is left after the engine's own embedders.
READ_CPUS = 0.0
READ_TASKS = 2  # reads at once: a 0-CPU task has no CPU cap, so this bounds the worker processes they start
# Embedders (a MiniLM-size encoder over one unit's unconfident pairs, called between units) live as long as the
# engine. Holding even 0.25 CPU, they made every 1-CPU task wait on a 1-CPU cluster (Ray Data's own `from_arrow`
# metadata task among them), so they too ask for none.
EMBED_CPUS = 0.0
MIN_ACTOR_CPUS = 0.05  # below this the asked-for actors do not fit the cluster: refused, not scheduled


class PipelineStalled(RuntimeError):
    """A Ray pipeline made no progress for a bounded time (what waits for what is in the message)."""


def score_pair_batch(rm, rows: list[dict], *, max_len: int, batch_size: int) -> pl.DataFrame:
    """Rewards of one batch of pairs under one RM, one row per input pair. `status`: ok | over_length (a
    response alone does not fit `max_len`: not scorable, never silently skipped) | non_finite (NaN/inf reward)."""
    from pipelines.rm.score import score_rows  # here: torch stays out of start-up

    scored, length = score_rows(rm, rows, "", max_len=max_len, batch_size=batch_size)
    finite = scored.filter(pl.col("r_chosen").is_finite() & pl.col("r_rejected").is_finite())
    bad = scored.join(finite.select("pair_id"), on="pair_id", how="anti")
    parts = [finite.select("pair_id", "r_chosen", "r_rejected", "margin", "p", status=pl.lit("ok"),
                           detail=pl.lit(None, pl.String)),
             bad.select("pair_id", "r_chosen", "r_rejected", "margin", "p", status=pl.lit("non_finite"),
                        detail=pl.lit("reward is not finite"))]
    if length["unscored_ids"]:
        parts.append(pl.DataFrame({"pair_id": length["unscored_ids"]}, schema={"pair_id": pl.String}).select(
            "pair_id", r_chosen=pl.lit(None, pl.Float64), r_rejected=pl.lit(None, pl.Float64),
            margin=pl.lit(None, pl.Float64), p=pl.lit(None, pl.Float64), status=pl.lit("over_length"),
            detail=pl.lit(f"a response alone exceeds max_len={max_len}")))
    return pl.concat([x.cast(SCORE_COLUMNS) for x in parts])


TEXT_COLUMNS = {"text_key": pl.String, "reward": pl.Float64, "tokens": pl.Int64, "truncated": pl.String}


def score_text_batch(rm, rows: list[dict], *, max_len: int, batch_size: int) -> pl.DataFrame:
    """One reward per (text_key, history, response) row, with the tokens scored and how it was cut."""
    from pipelines.rm.score import score_texts_detailed  # here: torch stays out of start-up

    out = score_texts_detailed(rm, [(r["history"], r["response"]) for r in rows], max_len=max_len,
                               batch_size=batch_size)
    return pl.DataFrame({"text_key": [r["text_key"] for r in rows], "reward": [o[0] for o in out],
                         "tokens": [o[1] for o in out], "truncated": [o[2] for o in out]}, schema=TEXT_COLUMNS)


UnitReader = Callable[[object], pl.DataFrame]  # a work unit -> its pairs (run where the engine runs it)


class Engine(Protocol):
    def score(self, pairs: pl.DataFrame, refs: dict[str, ModelRef]) -> dict[str, pl.DataFrame]: ...

    def score_units(self, units: list, read: UnitReader, refs: dict[str, ModelRef]
                    ) -> Iterator[tuple[object, pl.DataFrame, dict[str, pl.DataFrame]]]: ...

    def score_texts(self, texts: pl.DataFrame, models: dict[str, tuple[ModelRef, int]]) -> dict[str, pl.DataFrame]: ...

    def embed(self, texts: pl.DataFrame, model_path: str, max_len: int = 96) -> np.ndarray: ...

    def describe(self) -> str: ...


def _load_rm(path: str, device: str):
    """fp32 on CPU; bf16 on GPUs (half the memory and the bandwidth; scoring needs no fp32 accumulation outside
    what the kernels already do)."""
    import torch  # here, as below: torch and transformers stay out of start-up

    from pipelines.rm.model import load_reward_model

    return load_reward_model(path, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)


@dataclass
class InProcessEngine:
    """Scores and embeds in this process (tests, tiny data, one GPU). Models are loaded once per engine."""

    max_len: int = 128
    batch_size: int = 64
    device: str = "cpu"
    load: Callable[[str, str], object] = _load_rm
    rows_per_batch: int = 4096  # bounds the Python rows materialized at a time
    _models: dict = field(default_factory=dict, repr=False)

    def _model(self, ref: ModelRef):
        if ref.rm_version not in self._models:
            self._models[ref.rm_version] = self.load(ref.local_path(), self.device)
        return self._models[ref.rm_version]

    def score(self, pairs: pl.DataFrame, refs: dict[str, ModelRef]) -> dict[str, pl.DataFrame]:
        out = {}
        for role, ref in refs.items():
            rm = self._model(ref)
            parts = [score_pair_batch(rm, pairs.slice(i, self.rows_per_batch).select(PAIR_INPUT).to_dicts(),
                                      max_len=self.max_len, batch_size=self.batch_size)
                     for i in range(0, pairs.height, self.rows_per_batch)]
            out[role] = pl.concat(parts) if parts else pl.DataFrame(schema=SCORE_COLUMNS)
        return out

    def score_units(self, units: list, read: UnitReader, refs: dict[str, ModelRef]):
        """Each unit in turn: read it, score it under every model. Yields (unit, pairs, {role: scores})."""
        for unit in units:
            pairs = read(unit)
            yield unit, pairs, self.score(pairs, refs)

    def score_texts(self, texts: pl.DataFrame, models: dict[str, tuple[ModelRef, int]]) -> dict[str, pl.DataFrame]:
        """One reward per text (text_key, history, response) under each model {name: (ref, max_len)}. A model
        loaded only for this pass is freed after it (evaluation scores N models one after another: holding them
        all would need N models' memory); one already held (Stage 2's) stays."""
        out = {}
        for name, (ref, max_len) in models.items():
            held = ref.rm_version in self._models
            rm = self._model(ref)
            parts = [score_text_batch(rm, texts.slice(i, self.rows_per_batch).select(
                "text_key", "history", "response").to_dicts(), max_len=max_len, batch_size=self.batch_size)
                for i in range(0, texts.height, self.rows_per_batch)]
            out[name] = pl.concat(parts) if parts else pl.DataFrame(schema=TEXT_COLUMNS)
            if not held:
                del rm
                self.release(ref.rm_version)
        return out

    def describe(self) -> str:
        """What scored the texts, as the evaluation report names it."""
        return (f"transformers AutoModelForSequenceClassification in one process ({self.device}, "
                f"{'bf16' if self.device.startswith('cuda') else 'fp32'}, {self.batch_size} sequences a forward)")

    def release(self, rm_version: str) -> None:
        """Drop a loaded model (and its GPU memory)."""
        if self._models.pop(rm_version, None) is not None and self.device.startswith("cuda"):
            import torch  # here: torch stays out of start-up

            torch.cuda.empty_cache()

    def embed(self, texts: pl.DataFrame, model_path: str, max_len: int = 96) -> np.ndarray:
        from pipelines.embed import Embedder  # here: torch and transformers stay out of start-up

        key = ("embed", model_path, max_len)
        if key not in self._models:
            self._models[key] = Embedder(model_path, max_len, device=self.device)
        return self._models[key].encode(texts["text"].to_list())


def _read_units(batch: pa.Table, units: list, read: UnitReader) -> pa.Table:
    """Ray task: the pairs of the work unit(s) named in the batch, tagged with the unit's index."""
    parts = [read(units[k]).with_columns(_unit=pl.lit(k, pl.Int64)) for k in batch.column("_unit").to_pylist()]
    return pl.concat(parts).to_arrow()


class _PairScorer:
    """Ray actor: loads one RM once, then scores record batches; adds `<role>_*` columns."""

    def __init__(self, ref: ModelRef, role: str, max_len: int, batch_size: int, device: str,
                 scores_only: bool = False):
        self.rm = _load_rm(ref.local_path(), device)
        self.role, self.max_len, self.batch_size = role, max_len, batch_size
        self.scores_only = scores_only

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(PAIR_INPUT).to_pylist()
        s = score_pair_batch(self.rm, rows, max_len=self.max_len, batch_size=self.batch_size)
        s = s.rename({c: f"{self.role}__{c}" for c in s.columns if c != "pair_id"})
        out = pl.from_arrow(batch)
        if self.scores_only:  # the last pool: ids and scores travel on, the texts stay behind
            out = out.select("pair_id", *(c for c in out.columns if c == "_unit" or "__" in c))
        return out.join(s, on="pair_id", how="left").to_arrow()


class _TextScorer:
    """Ray actor: one model's rewards for a batch of texts, added as `<tag>__*` columns."""

    def __init__(self, ref: ModelRef, tag: str, max_len: int, batch_size: int, device: str,
                 keys_only: bool = False):
        self.rm = _load_rm(ref.local_path(), device)
        self.tag, self.max_len, self.batch_size = tag, max_len, batch_size
        self.keys_only = keys_only

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = score_text_batch(self.rm, batch.select(["text_key", "history", "response"]).to_pylist(),
                             max_len=self.max_len, batch_size=self.batch_size)
        s = s.rename({c: f"{self.tag}__{c}" for c in s.columns if c != "text_key"})
        out = pl.from_arrow(batch)
        if self.keys_only:  # the last pool: keys and rewards travel on, the texts stay behind
            out = out.drop("history", "response")
        return out.join(s, on="text_key", how="left").to_arrow()


@dataclass
class RayEngine:
    """Ray Data map_batches over an actor pool. Needs a running Ray (`ray.init`, done by the Dagster resource);
    `actors` actors per model, each with `gpus_per_actor` GPUs (0 = CPU actors)."""

    actors: int = 1  # per model; 0 = as many as the GPUs allow (gpus_total split over the models run together)
    gpus_per_actor: float = 0.0
    gpus_total: float = 0.0  # the cluster's GPUs, for actors = 0
    batch_rows: int = 1024  # pairs per map batch
    max_len: int = 128
    batch_size: int = 64  # sequences per forward inside an actor
    stall_timeout_s: float = 1800.0  # no batch for this long: fail (a scorer stuck, or far too slow)
    starved_timeout_s: float = 600.0  # actors not placed, or no batch while work waits for resources: fail
    stall_check_s: float = 5.0
    _embedders: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def _ray(self):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayEngine needs a running Ray: ray.init(...) first (the `ray` resource does it)")
        return ray

    def gpus_per_actor_pool(self, actor_pools: int) -> tuple[int, float]:
        """(actors per model, GPUs per actor) when `actor_pools` models run in one pipeline: the GPUs are shared between
        the actor pools, never asked for twice (one actor per GPU per pool would wait forever for GPUs that do not
        exist); with fewer GPUs than actor pools, the actor pools share GPUs fractionally."""
        if self.gpus_per_actor <= 0:
            return self.actors or 1, 0.0
        if self.actors:
            per = min(self.gpus_per_actor, self.gpus_total / (self.actors * actor_pools)) if self.gpus_total else \
                self.gpus_per_actor
            return self.actors, per
        if not self.gpus_total:
            return 1, self.gpus_per_actor
        actors = int(self.gpus_total // (self.gpus_per_actor * actor_pools))
        if actors >= 1:
            return actors, self.gpus_per_actor
        return 1, self.gpus_total / actor_pools

    def _map(self, ds, cls, kwargs: dict, num_cpus: float = 1.0, actor_pools: int = 1):
        import ray

        actors, gpus = self.gpus_per_actor_pool(actor_pools)
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=self.batch_rows, batch_format="pyarrow",
                              compute=ray.data.ActorPoolStrategy(size=actors),
                              num_gpus=gpus or None, num_cpus=num_cpus)

    def _scorer_pools(self, ds, refs: dict[str, ModelRef]):
        """One actor pool per RM, in turn; the last sends on ids and scores only (the texts stay behind)."""
        cpus = self._cpus_per_actor(len(refs))
        for i, (role, ref) in enumerate(refs.items()):
            ds = self._map(ds, _PairScorer, dict(ref=ref, role=role, max_len=self.max_len,
                                                 batch_size=self.batch_size, device=self.device,
                                                 scores_only=i == len(refs) - 1), num_cpus=cpus, actor_pools=len(refs))
        return ds

    def score(self, pairs: pl.DataFrame, refs: dict[str, ModelRef]) -> dict[str, pl.DataFrame]:
        """Both RMs in one pipeline: the texts are shipped once and every batch passes both actor pools."""
        ray = self._ray()
        if pairs.height == 0:
            return {role: pl.DataFrame(schema=SCORE_COLUMNS) for role in refs}
        table = pairs.select(PAIR_INPUT).to_arrow()  # blocks of batch_rows: both actor pools work at once
        ds = ray.data.from_arrow([table.slice(i, self.batch_rows) for i in range(0, table.num_rows, self.batch_rows)])
        ds = self._scorer_pools(ds, refs)
        wide = pl.concat([pl.from_arrow(b) for b in self._watched(ds, "score", len(refs))])
        return {role: wide.select("pair_id", *(pl.col(f"{role}__{c}").alias(c) for c in SCORE_COLUMNS
                                               if c != "pair_id")).cast(SCORE_COLUMNS)
                for role in refs}

    def score_units(self, units: list, read: UnitReader, refs: dict[str, ModelRef]):
        """Every unit through ONE Ray Data pipeline: read tasks -> one actor pool per model (loaded once for the
        whole run, not once per unit) -> the driver, in unit order (preserve_order), so it can commit each unit as
        soon as its last row arrives while later units are still being scored. Yields (unit, pairs, scores)."""
        ray = self._ray()
        if not units:
            return
        ds = ray.data.from_items([{"_unit": k} for k in range(len(units))], override_num_blocks=len(units))
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(_read_units, fn_kwargs={"units": units, "read": read}, batch_size=1,
                            batch_format="pyarrow", num_cpus=READ_CPUS, concurrency=READ_TASKS)
        ds = self._scorer_pools(ds, refs)
        pending: list[pl.DataFrame] = []
        nxt = 0  # the next unit to hand over
        for batch in self._watched(ds, "score_units", len(refs)):
            t = pl.from_arrow(batch)
            if t.height == 0:
                continue
            top = int(t["_unit"].max())
            pending.append(t)
            if top > nxt:  # order is preserved: every unit below `top` is complete
                done = pl.concat(pending)
                for k in range(nxt, top):
                    yield self._split(units[k], done.filter(pl.col("_unit") == k), refs, read)
                pending, nxt = [done.filter(pl.col("_unit") >= top)], top
        done = pl.concat(pending) if pending else None
        for k in range(nxt, len(units)):
            part = done.filter(pl.col("_unit") == k) if done is not None else None
            yield self._split(units[k], part, refs, read)

    @staticmethod
    def _split(unit, rows: pl.DataFrame | None, refs: dict[str, ModelRef], read: UnitReader):
        """The unit's pairs, read here from the lake, and its scores, which came through the pipeline.

        The pipeline brings back ids and scores only: a driver that took the texts from Ray's object store
        read them zero-copy, and every shared-memory page it touched stayed in its private memory (USS grew with
        the run, up to the store's size; benchmarks/RESULTS.md). Reading the unit again costs one bounded Delta
        read; only pairs that were scored are handed on (one verified since the read task ran drops out)."""
        if rows is None or rows.height == 0:  # a unit with no pool pair sends no rows
            pairs = read(unit).head(0)
            return unit, pairs, {role: pl.DataFrame(schema=SCORE_COLUMNS) for role in refs}
        scores = {role: rows.select("pair_id", *(pl.col(f"{role}__{c}").alias(c) for c in SCORE_COLUMNS
                                                 if c != "pair_id")).cast(SCORE_COLUMNS) for role in refs}
        pairs = read(unit).join(rows.select("pair_id"), on="pair_id", how="semi")
        return unit, pairs, scores

    def score_texts(self, texts: pl.DataFrame, models: dict[str, tuple[ModelRef, int]]) -> dict[str, pl.DataFrame]:
        """Every model in one pipeline (texts shipped once; all actor pools start together)."""
        ray = self._ray()
        if texts.height == 0:
            return {name: pl.DataFrame(schema=TEXT_COLUMNS) for name in models}
        # many blocks, not one: with a single block each model's actors wait for the previous model to finish it
        # (one core busy); with blocks of `batch_rows` every model's pool works on a different block at once
        table = texts.select("text_key", "history", "response").to_arrow()
        ds = ray.data.from_arrow([table.slice(i, self.batch_rows) for i in range(0, table.num_rows, self.batch_rows)])
        cpus = self._cpus_per_actor(len(models))
        for k, (ref, max_len) in enumerate(models.values()):
            ds = self._map(ds, _TextScorer, dict(ref=ref, tag=f"m{k}", max_len=max_len, batch_size=self.batch_size,
                                                 device=self.device, keys_only=k == len(models) - 1),
                           num_cpus=cpus, actor_pools=len(models))
        wide = pl.concat([pl.from_arrow(b) for b in self._watched(ds, "score_texts", len(models))])
        return {name: wide.select("text_key", *(pl.col(f"m{k}__{c}").alias(c) for c in TEXT_COLUMNS
                                                if c != "text_key")).cast(TEXT_COLUMNS)
                for k, name in enumerate(models)}

    def describe(self) -> str:
        """What scored the texts, as the evaluation report names it."""
        actors = (f"{self.actors} actor(s)" if self.actors else f"actors sized to {self.gpus_total:g} GPU(s)")
        where = (f"{self.gpus_per_actor:g} GPU each, bf16" if self.gpus_per_actor > 0 else "CPU, fp32")
        return (f"transformers AutoModelForSequenceClassification on Ray Data actor pools ({actors} a model, {where}, "
                f"{self.batch_size} sequences a forward)")

    def _embed_actors(self) -> int:
        return max(1, self.actors)

    def _cpus_per_actor(self, actor_pools: int) -> float:
        """CPUs each scorer actor asks for when `actor_pools` actor pools run together: the cluster's CPUs shared by every
        actor of every pool, at most 1 each. Reads and embedders ask for none (READ_CPUS, EMBED_CPUS), so no split
        of the CPUs can leave the pipeline's first stage, or the driver's embedding between units, waiting."""
        import ray

        actors, _ = self.gpus_per_actor_pool(actor_pools)
        total = ray.cluster_resources().get("CPU", 0.0)
        per = min(1.0, total / (actor_pools * actors))
        if per < MIN_ACTOR_CPUS:
            raise ValueError(f"{actor_pools} model(s) x {actors} actor(s) do not fit the Ray cluster's {total:g} CPU(s) "
                             f"(each would get {max(per, 0):.3f} CPU): lower ComputeResource.actors or add CPUs "
                             f"(ComputeResource.local_cpus for the local Ray)")
        # Ray keeps resources to 1e-4: rounding up (2/3 -> 0.6667) would make three actor pools ask for 2.0001 of 2 CPUs
        # and the third never start, so round down
        return math.floor(per * 1e4) / 1e4

    def _watched(self, ds, what: str, actor_pools: int) -> Iterator:
        """The pipeline's batches, failing instead of hanging when it makes no progress:
        - actors that cannot be placed: Ray Data itself gives up after `starved_timeout_s` (its
          `wait_for_min_actors_s`; it then shuts its executor down), raised here with what waits for what;
        - later, after `starved_timeout_s` without a batch while Ray reports work waiting for resources the
          cluster does not have free, or after `stall_timeout_s` without a batch at all.
        Only the time the driver waits counts (not the time it spends on a batch). The batches are pulled on a
        helper thread, since Ray Data's iterator itself has no timeout."""
        import ray

        ds.context.wait_for_min_actors_s = max(1, int(self.starved_timeout_s))
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def pump() -> None:
            try:
                for b in batches:
                    if not put(("batch", b)):
                        return
                put(("done", None))
            except BaseException as e:  # noqa: BLE001 - handed to the driver thread, raised there
                put(("error", e))

        threading.Thread(target=pump, daemon=True, name=f"ray-{what}").start()
        since = time.monotonic()
        try:
            while True:
                try:
                    kind, val = q.get(timeout=self.stall_check_s)
                except queue.Empty:
                    waited = time.monotonic() - since
                    starved = waiting_demands() if waited >= self.starved_timeout_s else []
                    if starved or waited >= self.stall_timeout_s:
                        raise PipelineStalled(self._stall_message(what, waited, starved, actor_pools)) from None
                    continue
                if kind == "done":
                    return
                if kind == "error":
                    if isinstance(val, ray.exceptions.GetTimeoutError) and "starting actors" in str(val):
                        raise PipelineStalled(self._stall_message(
                            what, time.monotonic() - since, [f"the scorer actors ({val})"], actor_pools)) from val
                    raise val
                yield val
                since = time.monotonic()
        finally:
            stop.set()

    def _stall_message(self, what: str, waited: float, starved: list[str], actor_pools: int) -> str:
        import ray

        actors, gpus = self.gpus_per_actor_pool(actor_pools)
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        free = {k: round(v, 3) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        held = (f"{actor_pools} actor pool(s) x {actors} actor(s) x {self._cpus_per_actor(actor_pools):g} CPU"
                f"{f' + {gpus:g} GPU' if gpus else ''}")
        waits = "; ".join(starved) if starved else "nothing waits for resources: a scorer is slow or stuck"
        return (f"Ray pipeline {what!r} made no progress for {waited:.0f} s. Waiting: {waits}. Cluster {total}, "
                f"free {free}; this engine holds {held}. Lower ComputeResource.actors, add CPUs/GPUs (local Ray: "
                f"ComputeResource.local_cpus), or raise ComputeResource.stall_timeout_s if batches are just slow.")

    def embed(self, texts: pl.DataFrame, model_path: str, max_len: int = 96) -> np.ndarray:
        """Embeddings on long-lived actors (one pool per model for the engine's life): Stage 2 embeds a few
        unconfident pairs per unit, so per-unit actor start-up would cost more than the work."""
        ray = self._ray()
        if texts.height == 0:
            return np.zeros((0, 0), dtype=np.float32)
        key = (model_path, max_len)
        if key not in self._embedders:
            # CPU actors even on a GPU cluster: the RM actor pools hold the GPUs for the whole run (a GPU embedder would
            # wait for one forever), and a MiniLM-size encoder over one unit's unconfident pairs is CPU work
            actor = ray.remote(num_cpus=EMBED_CPUS)(_EmbedActor)
            self._embedders[key] = [actor.remote(model_path, max_len, "cpu") for _ in range(self._embed_actors())]
        pool = self._embedders[key]
        rows = texts["text"].to_list()
        size = max(1, -(-len(rows) // len(pool)))
        parts = [pool[i % len(pool)].encode.remote(rows[j:j + size]) for i, j in enumerate(range(0, len(rows), size))]
        return np.concatenate(ray.get(parts)).astype(np.float32)


def waiting_demands() -> list[str]:
    """What Ray's tasks and actors wait for right now ("2 x {'CPU': 0.25}"), from the GCS (no dashboard needed);
    empty when nothing waits or the cluster does not say (an older or a client-mode connection)."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [f"{b.count} x {b.bundle}" for d in status.resource_demands.ray_task_actor_demand
                for b in d.bundles_by_count]
    except Exception:  # noqa: BLE001 - a diagnosis only: without it the plain stall timeout still applies
        return []


class _EmbedActor:
    def __init__(self, model_path: str, max_len: int, device: str):
        from pipelines.embed import Embedder  # here: the driver never loads torch for its actors

        self.emb = Embedder(model_path, max_len, device=device)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.emb.encode(texts)
