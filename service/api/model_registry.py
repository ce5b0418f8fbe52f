"""The LMs this server serves, each loaded on first use and unloaded when another needs its room.

Every LM named at start-up has a slot (`LMSlot`): its spec, its status (unloaded, loading, loaded, unloading), the
loaded `TextModel`, the requests that hold it and when it was last used. A request takes its model with
`acquire()` (loading it if need be, waiting while it loads) and gives it back with `release()` once its response
has ended (the route registers that with the request: `service.api.model_table.lm_for`). Everything here runs on
the event loop; a load runs on a thread of its own (`run_in_own_thread`), and each loaded LM has its own engine and
step thread, so a load blocks neither the loop nor the other models' steps.

Room: at most `Budget.max_models` LMs and `Budget.max_bytes` of estimated memory (weight files + the KV pool) are
loaded or loading at once. A model that does not fit unloads the least recently used *idle* models (no request
holds or waits for them) until it does; when none can go, the request waits until one becomes idle, up to its
`timeout_s` (the server's queue timeout), then gets a 503 `model_capacity` naming the busy models. A load that
takes longer than that leaves the request with a 503 `model_loading` (the load goes on). A load that fails is a
500 `model_load_failed` with the reason, for every request waiting for it; the model is then unloaded again and
the next request for it tries again.

Unloading (`unload()`, or eviction) first marks the model `unloading`: new requests for it wait, requests in flight
finish, then its engine stops and its memory goes; the waiting requests then load it again."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.api.errors import APIError
from service.api.model_specs import ModelSpec
from service.api.text_model import TextModel
from service.engine.own_thread import run_in_own_thread

log = logging.getLogger("service.models")


class Status(enum.Enum):
    """A slot's status, as /v1/models names it (llama-server's router mode's values, and `unloading`)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class ModelLoadError(Exception):
    """A load that failed; the message names the model and says why, on one line (already logged)."""


@dataclass(frozen=True)
class Budget:
    """How many LMs, and how many bytes of them (estimated), may be loaded at once."""

    max_models: int = 0  # 0: no limit
    max_bytes: int | None = None  # None: no limit
    kv_bytes: int = 0  # each LM's KV cache pool

    def estimate(self, spec: ModelSpec) -> int:
        """A model's memory when loaded, estimated: its weight files and its KV pool."""
        return spec.weight_bytes + self.kv_bytes

    def fits(self, specs: Sequence[ModelSpec]) -> bool:
        if self.max_models and len(specs) > self.max_models:
            return False
        return self.max_bytes is None or sum(self.estimate(s) for s in specs) <= self.max_bytes

    def check(self, specs: Sequence[ModelSpec], preload: Sequence[ModelSpec]) -> None:
        """ValueError for a budget no request could ever be served in: a model larger than it, or more preloaded
        models than it holds."""
        gib = 2**30
        for s in specs:
            if not self.fits([s]):
                raise ValueError(
                    f"model {s.name} needs about {self.estimate(s) / gib:.2f} GiB (weights {s.weight_bytes / gib:.2f}"
                    f" + KV cache {self.kv_bytes / gib:.2f}), more than max_loaded_memory="
                    f"{(self.max_bytes or 0) / gib:.2f} GiB: raise it, or lower kv_cache_memory_gb"
                )
        if not self.fits(preload):
            raise ValueError(
                f"the preloaded models ({', '.join(s.name for s in preload)}) do not fit max_loaded_models="
                f"{self.max_models} / max_loaded_memory: preload fewer or raise the limits"
            )


@dataclass(eq=False)
class LMSlot:
    """One LM the server serves, loaded or not."""

    spec: ModelSpec
    build: Callable[[], TextModel] | None  # loads and starts it (on a worker thread); None: given built, for good
    status: Status = Status.UNLOADED
    model: TextModel | None = None
    error: str | None = None  # why its last load failed, until one succeeds
    users: int = 0  # requests holding it (from acquire() to release())
    waiting: int = 0  # requests waiting for it to load
    last_used: float = 0.0  # time.monotonic() when a request last took or gave it back
    task: asyncio.Task[None] | None = None  # its load or unload under way
    # LoRA adapters served over it, id -> path: `build` attaches them to every load (`attach_adapters`), the
    # adapter routes add and remove them at run time
    adapters: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loaded(self) -> bool:
        return self.status is Status.LOADED

    @property
    def idle(self) -> bool:
        """Loaded, and neither held nor waited for: the only state in which it may be evicted."""
        return self.status is Status.LOADED and self.users == 0 and self.waiting == 0 and self.build is not None


def attach_adapters(tm: TextModel, adapters: dict[str, str], model: str) -> None:
    """Serve LoRA adapters (id -> path) on a just-built model's engine (on a worker thread: it reads their files).
    ModelLoadError naming the adapter that does not load."""
    for name, path in list(adapters.items()):
        try:
            tm.engine.load_lora(name, path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load LoRA adapter {name} ({path}) of model {model}: {e}") from e


class ModelRegistry:
    """The LM slots by name (in the order given: the first is the default), with the load budget."""

    def __init__(
        self,
        slots: Sequence[LMSlot],
        budget: Budget,
        stop: Callable[[TextModel, str], None],
        on_change: Callable[[LMSlot], None] = lambda slot: None,
    ) -> None:
        self._slots = {s.name: s for s in slots}
        self.budget = budget
        self._stop = stop  # stops a loaded model's engine and frees it, on a worker thread (with why: requested,
        # evicted or shutdown)
        self._on_change = on_change  # after every status change (metrics)
        self._changed = asyncio.Event()

    # ---- reading ---------------------------------------------------------------------------
    @property
    def slots(self) -> list[LMSlot]:
        return list(self._slots.values())

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def get(self, name: str) -> LMSlot | None:
        return self._slots.get(name)

    def loaded(self) -> list[TextModel]:
        return [s.model for s in self._slots.values() if s.model is not None and s.status is Status.LOADED]

    # ---- requests --------------------------------------------------------------------------
    async def acquire(self, name: str, timeout_s: float | None) -> tuple[TextModel, bool]:
        """The model `name`, held for a request until `release(name)`; loaded first if it is not (the second value
        says whether the request waited). Raises APIError: 503 when it cannot be loaded within `timeout_s` (None:
        no limit), 500 when its load fails."""
        slot = self._slots[name]
        if slot.status is Status.LOADED:
            return self._take(slot), False
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        slot.waiting += 1
        try:
            while not slot.loaded:
                left = None if deadline is None else deadline - loop.time()
                if slot.status is Status.UNLOADED and not self._start_load(slot):
                    if not await self._wait_change(left):
                        raise self._no_room(slot, timeout_s)
                    continue
                task = slot.task
                assert task is not None
                try:
                    await asyncio.wait_for(asyncio.shield(task), None if left is None else max(left, 0.0))
                except TimeoutError:
                    raise APIError(
                        f"model {name} is still {slot.status.value} after {timeout_s or 0:g} s; retry later",
                        503,
                        code="model_loading",
                        headers={"Retry-After": "5"},
                    ) from None
            return self._take(slot), True
        finally:
            slot.waiting -= 1
            self._notify()

    def release(self, name: str) -> None:
        """A request is done with the model (its response has ended)."""
        slot = self._slots[name]
        slot.users -= 1
        slot.last_used = time.monotonic()
        if slot.users == 0:
            self._notify()

    def _take(self, slot: LMSlot) -> TextModel:
        assert slot.model is not None
        slot.users += 1
        slot.last_used = time.monotonic()
        return slot.model

    def _no_room(self, slot: LMSlot, timeout_s: float | None) -> APIError:
        busy = ", ".join(f"{s.name} ({s.users} in flight)" for s in self._occupying(slot))
        return APIError(
            f"model {slot.name} cannot be loaded: the models loaded ({busy}) fill the server's "
            f"max_loaded_models / max_loaded_memory and none became idle within {timeout_s or 0:g} s; retry later",
            503,
            code="model_capacity",
            headers={"Retry-After": "5"},
        )

    # ---- loading and unloading -------------------------------------------------------------
    async def load(self, name: str, timeout_s: float | None) -> TextModel:
        """Load `name` if it is not loaded (POST /models/load, --preload), as a request would, without holding it."""
        tm, _ = await self.acquire(name, timeout_s)
        self.release(name)
        return tm

    async def unload(self, name: str, reason: str = "requested") -> bool:
        """Unload `name` once the requests in flight on it have finished (new ones wait, then load it again);
        False when it was not loaded. ValueError for a model given built (it could not be loaded again)."""
        slot = self._slots[name]
        if slot.build is None:
            raise ValueError(f"model {name} was given to the server built: it cannot be unloaded")
        while slot.status in (Status.LOADING, Status.UNLOADING):
            assert slot.task is not None
            try:
                await asyncio.shield(slot.task)
            except APIError:  # its load failed: nothing to unload
                return False
        if slot.status is Status.UNLOADED:
            return False
        self._start_unload(slot, reason)
        assert slot.task is not None
        await asyncio.shield(slot.task)
        return True

    async def close(self) -> None:
        """Stop every loaded engine (the server is stopping; the slots keep their models for a last look)."""
        for slot in self._slots.values():
            if slot.model is not None:
                await asyncio.to_thread(self._stop, slot.model, "shutdown")

    def _occupying(self, slot: LMSlot) -> list[LMSlot]:
        return [s for s in self._slots.values() if s is not slot and s.status is not Status.UNLOADED]

    def _start_load(self, slot: LMSlot) -> bool:
        """Start loading `slot` if it fits, unloading idle models (least recently used first) to make room; False
        when it does not fit yet (room is being freed, or every model in the way is busy)."""
        occupying = self._occupying(slot)
        if self.budget.fits([*(s.spec for s in occupying), slot.spec]):
            self._run(slot, Status.LOADING, self._load(slot))
            return True
        staying = [s for s in occupying if s.status is not Status.UNLOADING]
        if self.budget.fits([*(s.spec for s in staying), slot.spec]):
            return False  # the unloads under way make room
        victims = []
        for s in sorted((s for s in staying if s.idle), key=lambda s: s.last_used):
            victims.append(s)
            staying.remove(s)
            if self.budget.fits([*(s.spec for s in staying), slot.spec]):
                for v in victims:
                    log.info("unloading model %s (least recently used) to load %s", v.name, slot.name)
                    self._start_unload(v, "evicted")
                return False
        return False  # not enough idle models: wait until some are

    def _start_unload(self, slot: LMSlot, reason: str) -> None:
        self._run(slot, Status.UNLOADING, self._unload(slot, reason))

    def _run(self, slot: LMSlot, status: Status, work: Coroutine[Any, Any, None]) -> None:
        slot.status = status
        slot.task = asyncio.get_running_loop().create_task(work)
        slot.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: waiters may be none
        self._on_change(slot)
        self._notify()

    async def _load(self, slot: LMSlot) -> None:
        assert slot.build is not None
        t0 = time.monotonic()
        log.info("loading model %s", slot.name, extra={"fields": {"model": slot.name}})
        try:
            tm = await run_in_own_thread(slot.build, name="model-loader")
        except Exception as e:
            slot.status, slot.task = Status.UNLOADED, None
            why = str(e) if isinstance(e, ModelLoadError) else f"cannot load {slot.spec.label}: {type(e).__name__}: {e}"
            slot.error = " ".join(why.split())
            self._on_change(slot)
            self._notify()
            raise APIError(slot.error, 500, code="model_load_failed") from e
        tm.name = slot.name  # the id it is served by, whatever the loader called it
        slot.model, slot.error, slot.status, slot.task = tm, None, Status.LOADED, None
        slot.last_used = time.monotonic()
        log.info(
            "model %s loaded in %.1f s",
            slot.name,
            time.monotonic() - t0,
            extra={"fields": {"model": slot.name, "load_seconds": round(time.monotonic() - t0, 3)}},
        )
        self._on_change(slot)
        self._notify()

    async def _unload(self, slot: LMSlot, reason: str) -> None:
        while slot.users > 0:  # requests in flight finish first
            await self._wait_change(None)
        tm = slot.model
        assert tm is not None
        await asyncio.to_thread(self._stop, tm, reason)
        slot.model, slot.status, slot.task = None, Status.UNLOADED, None
        log.info("model %s unloaded (%s)", slot.name, reason, extra={"fields": {"model": slot.name, "reason": reason}})
        self._on_change(slot)
        self._notify()

    # ---- waiting for a change --------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout_s: float | None) -> bool:
        """Wait until a slot changes (a status, a request leaving); False after `timeout_s`."""
        if timeout_s is not None and timeout_s <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
