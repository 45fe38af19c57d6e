"""The Ray actor that holds a model on its device and renders segments.

Lifecycle, as in vLLM's workers: init device -> load model -> warm up -> render (many times)
-> shut down. Loading Wan's weights takes minutes on real hardware, so an actor lives as
long as the cluster and serves every job routed to its (variant, tier, rank).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import ray
import torch

from scheduler.parallel_cost import parse_plan
from workers.parallel.plan import (
    agree_on_request, agree_to_stop, apply_after_load, init_groups, pipeline_options,
)
from workers.parallel.placement import NotOnThisGroup, apply_placement, expert_loader
from workers.peak_memory import peak_bytes, reset_peak
from workers.progress_pace import pace, paced, without_pace
from workers.batch_render import BatchRenderMixin
from workers import resume_state
from workers.wan_pipeline import DenoiseState, RenderRequest, WanT2V

log = logging.getLogger(__name__)

# Handed-over states a split placement's high-noise rank keeps alive until the low-noise
# group has taken them (`release_handover`); a driver that died never releases its own, so
# the oldest go past this many or this age (each is a few latents: ~100 MB at A14B 720P).
HANDOVERS_KEPT = 32
HANDOVER_TTL_S = 3600.0


class RenderCanceled(Exception):
    """The request was canceled; raised between two denoising steps."""


class RenderPreempted(Exception):
    """The request yields its group (issue #15, item 1); raised between two denoising steps,
    after step ``step`` of ``steps`` (run by ``expert``): the render's state is saved."""

    def __init__(self, step: int, steps: int, expert: str):
        super().__init__(f"preempted after step {step} of {steps} ({expert})")
        self.step, self.steps, self.expert = step, steps, expert


def check_quantized_placement(variant: str, model_dir: str, placement: str,
                              quantize: str | None) -> None:
    """Quantized experts (``quantize`` at load, or a folder saved quantized: diffusers'
    config.json ``quantization_config``) run resident or split: ExpertOffload
    (workers/parallel/placement.py) swaps plain tensors only."""
    if placement != "offload":
        return
    config = Path(model_dir) / "transformer" / "config.json"
    saved = config.is_file() and "quantization_config" in json.loads(config.read_text())
    if quantize is not None or saved:
        what = f"quantize_on_load {quantize!r}" if quantize else "its folder is quantized"
        raise ValueError(f"placement 'offload' cannot hold quantized experts ({variant}: "
                         f"{what}); use placement resident or split")


class RenderWorker(BatchRenderMixin):
    """One rank of an actor group. ``plan`` (e.g. "tp2", "cfg2", "tp2+cfg2") and
    ``init_file`` (the group's rendezvous file) are given to every rank of a group.
    ``quantize`` (the variant's ``quantize_on_load``: int8-weight | int8-dynamic | fp8)
    quantizes the experts as they load (workers/lightening/quantize.py)."""

    def __init__(self, variant: str, model_dir: str, rank: int = 0, plan: str = "single",
                 init_file: str | None = None, collective_timeout_s: float = 120.0,
                 placement: str = "resident", role: str | None = None,
                 quantize: str | None = None):
        check_quantized_placement(variant, model_dir, placement, quantize)
        self.variant, self.model_dir, self.rank = variant, model_dir, rank
        self.quantize = quantize
        self.placement, self.role = placement, role  # role: "high" | "low" when split
        self.plan = parse_plan(plan)
        self.init_file, self.collective_timeout_s = init_file, collective_timeout_s
        self.groups = None
        self.device = self._init_device()
        self.pipeline: WanT2V | None = None
        self.warm = False
        self.renders = 0
        self._lock = threading.Lock()
        self._active: set[str] = set()  # request ids being rendered
        self._canceled: set[str] = set()
        self._preempting: set[str] = set()  # asked to yield at the next step (issue #15)
        # request id -> (time.monotonic() of the put, ObjectRef of the handed-over state)
        self._handovers: OrderedDict[str, tuple[float, ray.ObjectRef]] = OrderedDict()
        self._handover_lock = threading.Lock()
        self._cache: dict | None = None  # the step cache the pipeline has on (a route's)

    # ---- lifecycle ---------------------------------------------------------------------------

    def _init_device(self) -> torch.device:
        if torch.cuda.is_available():
            gpu_ids = ray.get_gpu_ids()
            return torch.device("cuda", 0 if not gpu_ids else 0)  # Ray sets CUDA_VISIBLE_DEVICES
        return torch.device("cpu")

    def load(self) -> None:
        with self._lock:
            if self.pipeline is None:
                started = time.monotonic()
                dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
                options = {}
                if self.plan.world > 1:
                    backend = "nccl" if self.device.type == "cuda" else "gloo"
                    self.groups = init_groups(self.plan, self.rank, self.init_file, backend,
                                              self.collective_timeout_s)
                    options = pipeline_options(self.plan, self.groups)
                # The placement decides where each expert is read to (the plan, how).
                load_expert = expert_loader(self.placement, self.role,
                                            options.get("load_expert"))
                self.pipeline = WanT2V.from_folder(self.model_dir, self.device, dtype,
                                                   load_expert=load_expert,
                                                   quantize=self.quantize)
                if self.groups is not None:
                    apply_after_load(self.pipeline, self.plan, self.groups)
                apply_placement(self.pipeline, self.placement, self.role, self.device)
                log.info("%s rank %d loaded %s in %.1fs", self.variant, self.rank,
                         self.model_dir, time.monotonic() - started)

    def warm_up(self) -> None:
        """One step at the smallest size: first-call costs are paid before a job waits on them."""
        with self._lock:
            if self.warm:
                return
            # The smallest frame the model takes: one transformer patch of latents.
            stride = self.pipeline.vae_stride_s * self._expert().config.patch_size[-1]
            # Sequence parallelism splits the tokens: one patch per rank.
            req = RenderRequest("warm up", "", frames=1, height=stride,
                                width=stride * self.plan.sp, steps=1,
                                guidance_high=1.0, guidance_low=1.0, seed=0)
            # The low-noise group of a split placement starts mid-render: it warms its decoder.
            latents = (self.pipeline.start(req).latents if self.role == "low"
                       else self.pipeline.denoise(req))
            next(self.pipeline.decode_chunks(latents))
            self.warm = True

    def _expert(self):
        """An expert this actor holds (the other may live on another group)."""
        return next(e for e in self.pipeline.experts if not isinstance(e, NotOnThisGroup))

    @ray.method(concurrency_group="control")
    def ready(self) -> dict:
        """Load and warm up if not done yet (idempotent); returns what this actor is."""
        self.load()
        self.warm_up()
        return self.info()

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        expert = self._expert() if self.pipeline is not None else None
        return {"variant": self.variant, "rank": self.rank, "plan": self.plan.name,
                "placement": self.placement, "role": self.role, "quantize": self.quantize,
                "heads_here": expert.blocks[0].attn1.heads if expert is not None else None,
                "token_shards": getattr(expert, "sp_world", 1), "device": str(self.device),
                "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),  # the host, in the job log
                "loaded": self.pipeline is not None, "warm": self.warm, "renders": self.renders}

    @ray.method(concurrency_group="control")
    def shutdown(self) -> None:
        with self._lock:
            self.pipeline = None
            self.warm = False
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- work ----------------------------------------------------------------------------------

    def _keep_handover(self, request_id: str, ref: ray.ObjectRef) -> None:
        """Hold the handed-over state's ref: an object put by this actor and passed on inside
        a streaming generator's item can lose its reference count before the low-noise group
        reads it (ReferenceCountingAssertionError, issue #11; ray-project/ray#58080)."""
        now = time.monotonic()
        with self._handover_lock:
            self._handovers[request_id] = (now, ref)
            while self._handovers and (
                    len(self._handovers) > HANDOVERS_KEPT
                    or now - next(iter(self._handovers.values()))[0] > HANDOVER_TTL_S):
                self._handovers.popitem(last=False)

    @ray.method(concurrency_group="control")
    def release_handover(self, request_id: str) -> None:
        """The low-noise group has taken ``request_id``'s state (or never will)."""
        with self._handover_lock:
            self._handovers.pop(request_id, None)

    @ray.method(concurrency_group="control")
    def handovers_held(self) -> list[str]:
        with self._handover_lock:
            return list(self._handovers)

    @ray.method(concurrency_group="control")
    def cancel(self, request_id: str) -> None:
        if request_id in self._active:  # a cancel after the render ended is a no-op
            self._canceled.add(request_id)

    @ray.method(concurrency_group="control")
    def preempt(self, request_id: str) -> None:
        """Yield the group at the next step boundary, the state saved (issue #15, item 1); a
        request after the render ended, or once its denoising is done, is a no-op."""
        if request_id in self._active:
            self._preempting.add(request_id)

    def _end_request(self, request_id: str) -> None:
        self._active.discard(request_id)
        self._canceled.discard(request_id)
        self._preempting.discard(request_id)

    def _check_canceled(self, request_id: str, where: str) -> None:
        if request_id in self._canceled:
            raise RenderCanceled(f"{request_id} canceled {where}")

    def _denoise(self, req: RenderRequest, request_id: str, state: DenoiseState | None = None
                 ) -> Iterator[tuple]:
        """The sampler's steps (this group's phase of them, when split); in a group every rank
        stops at the same step on a cancel, and yields after the same step on a preempt
        (RenderPreempted, raised when the step after it is asked for)."""
        stop_before = "low" if self.role == "high" else None
        if self.groups is not None:
            agree_on_request(request_id)
        for step, steps, expert, latents in self.pipeline.denoise_steps(req, state,
                                                                        stop_before):
            stop, yielding = self._stop_or_yield(request_id, step, steps)
            if stop:
                raise RenderCanceled(f"{request_id} canceled at step {step} of {steps}")
            yield step, steps, expert, latents
            if yielding:
                raise RenderPreempted(step, steps, expert)

    def _stop_or_yield(self, request_id: str, step: int, steps: int) -> tuple[bool, bool]:
        """(cancel, preempt) as every rank of the group agrees: any rank told to stop stops
        them all, and a cancel wins over a preempt. After the last step there is nothing
        left to save: a preempt is ignored (the segment finishes)."""
        stop = request_id in self._canceled
        yielding = request_id in self._preempting and step < steps
        if self.groups is None:
            return stop, yielding and not stop
        if not agree_to_stop(stop or yielding):
            return False, False
        stop = agree_to_stop(stop)  # only when some rank stops: one more collective
        return stop, not stop

    def follow(self, request: dict, request_id: str, state: DenoiseState | None = None) -> None:
        """Ranks 1..N-1 of a group: the same loop as rank 0, whose latents are the result."""
        req = self._prepare(request)
        self._active.add(request_id)
        try:
            try:
                state = self._on_device(state, req)
            except resume_state.ResumeStateError:
                return  # rank 0 refuses the same bytes too, and says so (`render`)
            for _ in self._denoise(req, request_id, state):
                pass
        except RenderPreempted:
            pass  # rank 0 saves the state; this rank's is the same
        finally:
            self._end_request(request_id)

    def latents(self, request: dict, request_id: str, state: DenoiseState | None = None):
        """Rank 0's latents after the sampler (this group's phase of it), for checks and
        benchmarks; the high-noise group of a split placement returns its handover state."""
        req = self._prepare(request)
        self._active.add(request_id)
        try:
            state = self._on_device(state, req) or self.pipeline.start(req)
            for _ in self._denoise(req, request_id, state):
                pass
            state = state.to("cpu")
            return state if self.role == "high" else state.latents
        finally:
            self._end_request(request_id)

    def _prepare(self, request: dict) -> RenderRequest:
        """Load if needed, set the step cache this request's route asks for (its ``cache``:
        workers/lightening/step_cache.py; None: every step runs) and build the request.
        Renders run one at a time here, so switching between requests is safe."""
        self.load()
        request = without_pace(request)
        cache = request.pop("cache", None)
        if cache != self._cache:
            from workers.lightening import step_cache

            step_cache.disable(self.pipeline)
            self._cache = None
            if cache is not None:
                step_cache.enable(self.pipeline, cache)
                self._cache = cache
        return RenderRequest(**request)

    def _on_device(self, state: DenoiseState | bytes | None,
                   req: RenderRequest | None = None) -> DenoiseState | None:
        """A state handed over through the object store, or a preempted render's saved one
        (bytes, workers/resume_state.py), onto this actor's device."""
        if state is None:
            return None
        if not isinstance(state, (bytes, bytearray, memoryview)):
            return state.to(self.device)
        # Each solver tensor back where it was saved from (UniPC's sigmas on the CPU).
        state = resume_state.load(state, self.pipeline.scheduler, device=self.device)
        if req is not None:
            resume_state.check_fits(state, req.steps, self.pipeline.latent_shape(req))
        return state

    def _preempted(self, state: DenoiseState, stop: RenderPreempted) -> dict:
        """The event a yielding render ends with: its state saved, and which expert runs
        the next step (a split placement resumes on that expert's group)."""
        t = float(state.scheduler.timesteps[state.step])
        info = dict(steps=stop.steps, expert=stop.expert,
                    next_expert=self.pipeline.expert_for(t)[1])
        data = resume_state.save(state, **info)
        return {"kind": "preempted", "state": data, "sha256": resume_state.sha256_of(data),
                "step": state.step, "at": time.time(), **info}

    def render(self, request: dict, request_id: str, latent_frames_per_chunk: int = 4,
               state: DenoiseState | None = None) -> Iterator[dict]:
        """`_render_events`, with progress events at most every ``progress_every_s`` of
        the request (workers/progress_pace.py; absent: every step)."""
        yield from paced(self._render_events(request, request_id, latent_frames_per_chunk,
                                             state), pace(request))

    def _render_events(self, request: dict, request_id: str, latent_frames_per_chunk: int,
                       state: DenoiseState | None) -> Iterator[dict]:
        """Stream of events: {"kind": "progress", step, steps, expert, at, began} per
        denoising step (``at``: time.time() after the step; ``began``: when this render
        started here, before its first step), then {"kind": "frames", "frames": uint8
        (T, H, W, 3)} per decoded chunk. In a group, rank 0 runs this and decodes; the other
        ranks run `follow`. The high-noise group of a split placement ends with
        {"kind": "handover", "state"} instead of frames; the low-noise group's render starts
        from that ``state``, and the driver then calls `release_handover` on the high-noise
        rank 0. A render asked to `preempt` ends after its next step with {"kind":
        "preempted", "state": bytes, "sha256", "step", "steps", "expert", "next_expert"}
        (issue #15); ``state`` may be such bytes: the render resumes from them, or, when
        they do not fit this pipeline and request, its only event is {"kind":
        "resume_refused", "error"}."""
        began = time.time()
        reset_peak(self.device)
        req = self._prepare(request)
        if self.role == "low" and state is None:
            raise ValueError("the low-noise group of a split placement needs the handed-over "
                             "state of the high-noise group")
        self._active.add(request_id)
        try:
            try:
                state = self._on_device(state, req) or self.pipeline.start(req)
            except resume_state.ResumeStateError as exc:
                # A saved state this pipeline cannot continue (its solver's config or the
                # latents' shape differ: a redeploy): said as the only event, not raised, so
                # no rank's error takes the group down; the farm starts over from noise.
                yield {"kind": "resume_refused", "error": str(exc), "at": time.time()}
                return
            # Stage times (issue #13): ``loaded`` ends the load stage (model, step cache, the
            # start state); ``decode_s`` is the seconds spent decoding each chunk of frames.
            loaded = time.time()
            latents = state.latents
            try:
                for step, steps, expert, latents in self._denoise(req, request_id, state):
                    yield {"kind": "progress", "step": step, "steps": steps,
                           "expert": expert, "at": time.time(), "began": began,
                           "loaded": loaded, "peak_memory_bytes": peak_bytes(self.device)}
            except RenderPreempted as stop:
                yield self._preempted(state, stop) | {"began": began}
                return
            if self.role == "high":  # by reference: the driver never unpickles GPU state
                ref = ray.put(state.to("cpu"))
                self._keep_handover(request_id, ref)
                yield {"kind": "handover", "state": ref, "at": time.time(), "began": began}
                return
            decoding = time.monotonic()
            for frames in self.pipeline.decode_chunks(latents, latent_frames_per_chunk):
                self._check_canceled(request_id, "while decoding")
                decode_s = time.monotonic() - decoding
                yield {"kind": "frames", "frames": frames, "decode_s": decode_s,
                       "peak_memory_bytes": peak_bytes(self.device)}
                decoding = time.monotonic()  # the consumer's time is not decoding
            self.renders += 1
        finally:
            self._end_request(request_id)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# Calls to `render` run one at a time; `control` calls (cancel, info) run beside them.
RemoteRenderWorker = ray.remote(concurrency_groups={"control": 2})(RenderWorker)
