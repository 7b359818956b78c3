"""`kvjax.Engine`: continuous batching of compressed requests over one shared pool.

    engine = kvjax.Engine(model, tokenizer, kv_budget="2GiB", max_running=8,
                          press=kvjax.SnapKVPress(compression_ratio=0.75))
    req = engine.submit("a long document ...", question="...", max_new_tokens=64)
    engine.run()                   # or engine.step() from your own loop, or engine.stream(req)
    req.result()                   # tokens, text, finish reason

Every request is prefilled and compressed alone through the library's one path
(`kvjax.plan.plan_request`, `kvjax.prefill`), its question appended, and its kept entries
written into a block of the pool of exactly the slots they span; then it decodes with every
other running request in one jitted step (`kvjax.engine.step.decode_slots`). A finished or
cancelled request returns its block and slot at once, and the next waiting request is
admitted into them. Shapes never change with the requests: one decode compilation per
bucket of running requests (powers of two up to `max_running`), one prefill and one block
write per prompt bucket and press.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.buckets import bucket_length
from kvjax.context import CompressedContext, model_fingerprint, with_tail
from kvjax.engine.blocks import BlockAllocator
from kvjax.engine.pool import (absorb_tail, attach, compact_store, compaction_moves, detach,
                               empty_pool, move_blocks, slot_cache, used_slots, write_block)
from kvjax.engine.request import Request, RequestResult, Status, as_id_list
from kvjax.engine.step import SlotState, bucket_slots, decode_slots, set_slot
from kvjax.loops import eos_ids, extend
from kvjax.plan import check_hooks, check_token_ids, plan_request, split_model
from kvjax.prefill import prefill_prompt, prefill_request
from kvjax.quant import resolve_kv_quant
from kvjax.sampling import MAX_TRACED, Greedy, check_sampler, sampler_family
from kvjax.sharding import mesh_of, store_rows

UNSET = object()
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(value) -> int:
    """An int of bytes, or a string like "2GiB", "512 MiB", "1.5GB" -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_budget={value!r} is not a byte count (an int, or e.g. "
                             "'2GiB', '512MiB', '1.5GB')")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"kv_budget={value!r} must be a positive number of bytes")
    return n


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """running / waiting requests; pool_slots (per store row), slots_used / slots_free;
    bytes_held: the pool and tails allocated at construction (the budget's share used);
    bytes_needed: kv bytes of the entries the running requests keep (pool blocks + tail
    tokens); tokens_generated: since construction; contexts_held: contexts pinned by
    `Engine.hold`; compactions: times the pool's blocks were slid together to admit a
    request that only fragmentation kept out; preemptions: running requests taken out to
    let another grow (each resumed by recompute)."""

    running: int
    waiting: int
    pool_slots: int
    slots_used: int
    slots_free: int
    bytes_held: int
    bytes_needed: int
    tokens_generated: int
    contexts_held: int = 0
    compactions: int = 0
    preemptions: int = 0


class Engine:
    """Serve many requests with per-request presses over one memory pool.

    Args:
      model: a model with `kvjax_split()` (e.g. `models.Decoder`).
      tokenizer: needed for text and compressed-context requests and stop strings.
      kv_budget: bytes (or "2GiB") for the pool and the per-slot tails together.
      max_running: slots decoded together in one step.
      press: the default press of a request (None: the full cache).
      kv_dtype: None, "int8" or "float8_e4m3fn": the pool stores kept entries quantized
        (per-entry scales).
      max_tail: dense tail slots per running request (question + generated tokens); a full
        tail moves into the pool, so generation is not bounded by it.
      attn_impl: as in `kvjax.generate`.
    """

    def __init__(self, model, tokenizer=None, *, kv_budget="2GiB", max_running: int = 8,
                 press=None, kv_dtype=None, max_tail: int = 512, attn_impl: str = "auto"):
        for name, val, lo in (("max_running", max_running, 1), ("max_tail", max_tail, 1)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ValueError(f"{name}={val!r} must be an int >= {lo}")
        check_hooks(press, None)
        self.fn, self.params = split_model(model)
        mesh = mesh_of(self.fn)
        if mesh is not None and mesh.shape.get("data", 1) > 1:
            raise ValueError(f"a mesh with data={mesh.shape['data']}: the engine shards heads "
                             "over 'model' and keeps one pool, so it runs on data=1 meshes "
                             "(e.g. models.make_mesh(1, 8)); run one engine per data shard")
        self.tokenizer, self.press = tokenizer, press
        self.model_id = model_fingerprint(model)
        self._pipe = None
        if tokenizer is not None:
            from kvjax.pipeline import Pipeline
            self._pipe = Pipeline(model, tokenizer, attn_impl=attn_impl, kv_dtype=kv_dtype)
        self.quant = resolve_kv_quant(kv_dtype)
        if self.quant is not None and not self.quant.scheme.per_entry:
            raise ValueError(f"kv_dtype={kv_dtype!r}: the engine's pool takes per-entry "
                             "scales (kvjax.quant.TokenScales) only")
        self.attn_impl = plan_request(self.fn, [[0]], max_new_tokens=0,
                                      attn_impl=attn_impl).attn_impl
        self.max_running, self.max_tail = int(max_running), int(max_tail)
        self.budget = parse_bytes(kv_budget)
        self._build_pool()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}
        self._free_slots = list(range(self.max_running - 1, -1, -1))
        self._samplers: list = [Greedy()]  # sampler families (kvjax.sampling.sampler_family)
        self._contexts: dict[int, tuple] = {}  # id -> (context, block, packed store)
        self._held: dict[int, CompressedContext] = {}  # contexts pinned by hold()
        self._next_id, self._steps, self._generated, self._closed = 0, 0, 0, False
        self._compactions = self._preemptions = 0

    # -- construction ----------------------------------------------------------------

    def _model_shapes(self):
        """(L, K, H, dtype, V) from an abstract prefill of one token (nothing runs)."""
        toks = jax.ShapeDtypeStruct((1, 64), jnp.int32)
        lens = jax.ShapeDtypeStruct((1,), jnp.int32)
        from kvjax.observation import ObsSpec
        logits, prompt = jax.eval_shape(
            lambda p, t, n: prefill_prompt(self.fn, p, t, n, obs_spec=ObsSpec(),
                                           attn_impl=self.attn_impl), self.params, toks, lens)
        n_layers = sum(g.n_layers for g in prompt.groups)
        k = prompt.groups[0].layers.k  # [L_g, B, K, T, H]
        return n_layers, k.shape[2], k.shape[4], k.dtype, logits.shape[-1]

    def _build_pool(self):
        n_layers, n_kv, h, dtype, vocab = self._model_shapes()
        rows = store_rows(mesh_of(self.fn), n_kv)
        kbytes = jnp.dtype(dtype if self.quant is None else self.quant.dtype).itemsize
        per_slot = rows * (2 * h * kbytes + 4 + (8 if self.quant is not None else 0))
        tail_bytes = self.max_running * (2 * n_layers * n_kv * self.max_tail * h
                                         * jnp.dtype(dtype).itemsize + 4 * self.max_tail)
        n_slots = (self.budget - tail_bytes) // per_slot
        if n_slots < 8:
            raise ValueError(
                f"kv_budget={self.budget} bytes leaves {max(n_slots, 0)} pool slots after the "
                f"tails of {self.max_running} running requests ({tail_bytes} bytes for "
                f"max_tail={self.max_tail}): raise kv_budget or lower max_running/max_tail")
        self.allocator = BlockAllocator(int(n_slots), align=8)
        self._shapes = dict(n_layers=n_layers, n_kv=n_kv, head_dim=h, dtype=dtype, rows=rows)
        self._slot_bytes, self._tail_token_bytes = per_slot, 2 * n_layers * n_kv * h * \
            jnp.dtype(dtype).itemsize
        self._bytes_held = self.allocator.n_slots * per_slot + tail_bytes
        cache = empty_pool(n_layers=n_layers, n_kv=n_kv, rows=rows,
                           n_slots=self.allocator.n_slots, head_dim=h,
                           max_running=self.max_running, tail=self.max_tail, dtype=dtype,
                           quant=self.quant, max_segment=self.fn.max_seq_len)
        keys = jax.random.split(jax.random.key(0), self.max_running)
        self._state = SlotState(logits=jnp.zeros((self.max_running, vocab), jnp.float32),
                                rng=keys, cache=cache)

    # -- submit ----------------------------------------------------------------------

    def submit(self, x, question: str = "", *, question_aware: bool = False, press=UNSET,
               max_new_tokens: int = 64, sampler=Greedy(), eos_id=UNSET, stop=(),
               rng=None, answer_prefix: str = "") -> Request:
        """Queue a request; every check runs here, so a bad request never reaches a step.

        Args:
          x: token ids (as `kvjax.generate` takes one prompt), a context string (the chat
            template applied exactly as `Pipeline.run` does), or a `CompressedContext`
            (answered as `Pipeline.ask` does; its store is held once for all its requests).
          question, question_aware, answer_prefix: as in `Pipeline.run` (text and contexts);
            for token ids, `question` may be ids appended after compression.
          press: this request's press (default: the engine's); not for a compressed context.
          max_new_tokens: >= 1; sampler: Greedy(), Temperature, TopK, TopP; rng: its key.
          eos_id: id or ids that end it (default: the tokenizer's for text and contexts, none
            for token ids, as `kvjax.generate`); stop: strings that end it (text decoded).
        """
        if self._closed:
            raise RuntimeError("submit after shutdown(): this engine accepts no requests")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"{max_new_tokens=} must be an int >= 1")
        check_sampler(sampler)
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if stop and self.tokenizer is None:
            raise ValueError(f"{stop=} needs a tokenizer to decode the text")
        ids, q_ids, context, plan = self._inputs(x, question, question_aware, answer_prefix,
                                                 press, int(max_new_tokens))
        if eos_id is UNSET:
            eos_id = None if ids is not None and context is None and not isinstance(x, str) \
                else (self.tokenizer.eos_ids if self.tokenizer is not None else None)
        eos = eos_ids(eos_id, getattr(self.fn, "vocab_size", None))
        family, _ = sampler_family(sampler)
        if family not in self._samplers:
            self._samplers.append(family)
        req = Request(id=self._next_id, ids=ids, question_ids=q_ids, context=context,
                      plan=plan, max_new_tokens=int(max_new_tokens), sampler=sampler,
                      eos_ids=eos, stop=stop,
                      rng=jax.random.key(0) if rng is None else rng,
                      submitted_step=self._steps, submit_time=time.perf_counter(),
                      _engine=self)
        self._next_id += 1
        self._waiting.append(req)
        return req

    def _inputs(self, x, question, question_aware, answer_prefix, press, max_new_tokens):
        """(context ids, question ids, CompressedContext or None, plan or None), checked."""
        if isinstance(x, CompressedContext):
            return (None, self._context_question(x, question, question_aware, answer_prefix,
                                                 press), x, None)
        if isinstance(x, str):
            if self._pipe is None:
                raise ValueError("a text request needs a tokenizer: Engine(model, tokenizer)")
            ids, q_ids = self._pipe.encode(x, question, answer_prefix=answer_prefix,
                                           question_aware=question_aware)
        else:
            ids = as_id_list(x)
            if ids is None:
                raise ValueError(f"cannot submit {type(x).__name__}: pass token ids, a "
                                 "context string or a CompressedContext")
            if isinstance(question, str) and question or question_aware or answer_prefix:
                raise ValueError("a token-id request takes its question as token ids "
                                 "(question=[...]); question_aware/answer_prefix are for text")
            q_ids = [] if isinstance(question, str) else as_id_list(question)
            if q_ids is None:
                raise ValueError(f"question of type {type(question).__name__}: a token-id "
                                 "request takes its question as a list of ids")
            check_token_ids([q_ids], getattr(self.fn, "vocab_size", None))
        press = self._press(press)
        plan = plan_request(self.fn, [ids], max_new_tokens=max_new_tokens, press=press,
                            kv_dtype=self.quant, tail_extra=len(q_ids),
                            attn_impl=self.attn_impl, tokenizer=self.tokenizer)
        self._check_bound(plan.press, len(ids),
                          max(0, len(q_ids) + max_new_tokens - self.max_tail))
        return ids, q_ids, None, plan

    def _check_bound(self, press, n: int, grow: int = 0) -> None:
        """ValueError when a full-cache request of n prompt tokens, and `grow` tokens that
        cannot stay in its tail, can never fit the whole pool (a compressed one is checked on
        its exact count once compressed, at admission, and as it grows)."""
        if press is not None:
            return
        n_layers, n_kv, rows = (self._shapes[k] for k in ("n_layers", "n_kv", "rows"))
        per_row = n_layers * (n_kv // rows) * (n + grow)
        if self.allocator.rounded(per_row) > self.allocator.n_slots:
            more = f" and at least {grow} tokens beyond its tail" if grow else ""
            raise ValueError(f"the full cache of a {n}-token prompt{more} keeps {per_row} "
                             f"slots per store row; the pool has {self.allocator.n_slots} "
                             "(raise kv_budget or pass a press)")

    def _press(self, press):
        """The request's press (the engine's default for UNSET), refused if the pool cannot
        hold what it makes."""
        press = self.press if press is UNSET else press
        if press is not None and check_hooks(press, None) is not None:
            raise ValueError(f"{type(press).__name__} brings a decode hook, which the engine "
                             "does not run yet: use kvjax.generate for it")
        if press is not None and press.channel_pruner is not None:
            raise ValueError(f"{type(press).__name__} prunes key channels, which the "
                             "engine's pool does not hold yet: use kvjax.generate for it")
        return press

    def compress(self, context: str, *, press=UNSET) -> CompressedContext:
        """Compress `context` once, question-agnostic, as `Pipeline.compress` does (the
        engine's press and kv dtype by default), for `hold` and compressed-context requests."""
        if self._pipe is None:
            raise ValueError("compress() needs a tokenizer: Engine(model, tokenizer)")
        return self._pipe.compress(context, press=self._press(press))

    @property
    def slot_bytes(self) -> int:
        """Bytes of one pool slot over every store row (keys, values, positions, scales)."""
        return self._slot_bytes

    def _context_question(self, ctx, question, question_aware, answer_prefix, press):
        if press is not UNSET:
            raise ValueError("press= cannot be given with a CompressedContext: it was "
                             f"compressed already (by {ctx.press})")
        if question_aware:
            raise ValueError("question_aware=True needs the context text, not a "
                             "CompressedContext (compressed question-agnostic)")
        if self._pipe is None:
            raise ValueError("a CompressedContext request needs a tokenizer")
        self._check_context(ctx)
        return self._pipe.encode("", question, answer_prefix=answer_prefix)[1]

    def _check_context(self, ctx) -> None:
        """ValueError unless `ctx` can join the pool (model, layout, size)."""
        if ctx.model_id != self.model_id:
            raise ValueError(f"this context was compressed by model {ctx.model_id}, not the "
                             f"engine's ({self.model_id})")
        st = ctx.cache.store
        if ctx.cache.hook is not None or st.channels is not None:
            raise ValueError("a context with a decode hook or thin keys cannot join the pool")
        if st.quant != self.quant or st.rows != self._shapes["rows"]:
            raise ValueError(f"the context's store (quant={st.quant}, rows={st.rows}) differs "
                             f"from the engine's pool (quant={self.quant}, "
                             f"rows={self._shapes['rows']})")
        used = int(used_slots(compact_store(st)))
        if self.allocator.rounded(used) > self.allocator.n_slots:
            raise ValueError(f"the context keeps {used} slots per row; the pool has "
                             f"{self.allocator.n_slots} (raise kv_budget)")

    # -- the loop ----------------------------------------------------------------------

    def step(self) -> list[tuple[Request, int]]:
        """Admit what fits, move full tails into the pool (preempting the newest requests
        while it cannot hold them), then one jitted decode step of every running request.

        Returns the (request, token) pairs generated in this step."""
        self._admit()
        for req in [r for r in self._running.values() if r._tail >= self.max_tail]:
            if req.slot is not None:  # not preempted by an earlier one's growth
                self._grow(req)
        if not self._running:
            return []
        slots = bucket_slots(list(self._running), self.max_running)
        b = len(slots)
        active = np.zeros(b, bool)
        fam = np.zeros(b, np.int32)
        values = np.ones((b, MAX_TRACED), np.float32)
        for i, slot in enumerate(slots):
            req = self._running.get(slot)
            if req is None:
                continue
            family, vals = sampler_family(req.sampler)
            active[i], fam[i] = True, self._samplers.index(family)
            values[i, :len(vals)] = vals
        tok_b, self._state, ok_b = decode_slots(self.fn, self.params, self._state,
                                                jnp.asarray(slots, jnp.int32),
                                                jnp.asarray(active), jnp.asarray(fam),
                                                jnp.asarray(values),
                                                samplers=tuple(self._samplers),
                                                attn_impl=self.attn_impl)
        tok = dict(zip(slots, np.asarray(tok_b).tolist()))
        ok = dict(zip(slots, np.asarray(ok_b).tolist()))
        self._steps += 1
        events = []
        for slot, req in list(self._running.items()):
            t = int(tok[slot])
            req.tokens.append(t)
            req._tail += 1
            self._generated += 1
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            events.append((req, t))
            reason = self._finish_reason(req, t)
            if reason is None and not ok[slot]:
                req.error = "the logits after this token are not finite (NaN or inf)"
                reason = "error"
            if reason is not None:
                self._finish(req, reason)
        return events

    def _finish_reason(self, req: Request, t: int) -> str | None:
        if t in req.eos_ids:
            return "stop"
        if req.stop:
            text = self.tokenizer.decode(req.tokens)
            hits = [text.index(s) for s in req.stop if s in text]
            if hits:
                req.text = text[:min(hits)]
                return "stop"
        return "length" if len(req.tokens) >= req.max_new_tokens else None

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            try:
                admitted = self._admit_one(req, self._free_slots[-1])
            except Exception as err:  # noqa: BLE001 - the request fails, the engine serves on
                self._waiting.popleft()
                req.error = f"{type(err).__name__}: {err}"
                self._finish(req, "error")
                continue
            if not admitted:
                return
            self._waiting.popleft()

    def _admit_one(self, req: Request, slot: int) -> bool:
        """Prefill, compress and attach `req` to `slot`; False when its block does not fit
        yet (it stays first in line; its compressed cache is kept for the next try).

        A compressed context's block is shared by its requests; a request whose question does
        not fit the tail, or a preempted one resuming (its question and generated tokens fed
        again), gets a private block with those tokens absorbed (`pool.absorb_tail`)."""
        if req.context is not None and not req.tokens and \
                len(req.question_ids) < self.max_tail:
            block, store = self._context_block(req.context)
            if block is None:
                return False
            req.block, used = block, int(used_slots(store))  # _finish releases it on failure
            cache = req.context.cache
            if req.question_ids:  # fed into a copy: the context stays untouched
                cache = jax.tree.map(jnp.copy, cache)
            cache, logits = self._feed(cache, req.context.logits, req.question_ids)
            cache = dataclasses.replace(cache, store=store)  # the packed table of the block
        else:
            if req._pending is None:
                req._pending = self._prepare(req)
            cache, logits = req._pending
            used = int(used_slots(cache.store))
            block = self._allocate(used)
            if block is None:
                if not self._running:
                    raise ValueError(f"the compressed prompt keeps {used} slots per row; the "
                                     f"pool's largest free run is {self.allocator.largest_free}"
                                     f" of {self.allocator.n_slots} (raise kv_budget)")
                return False
            req._pending, req.block = None, block  # released by _finish if a write fails
            self._state = dataclasses.replace(
                self._state, cache=write_block(self._state.cache, cache.store,
                                               jnp.int32(block.start), jnp.int32(used)))
        pool = attach(self._state.cache, cache, jnp.int32(slot), jnp.int32(block.start))
        self._state = set_slot(dataclasses.replace(self._state, cache=pool), jnp.int32(slot),
                               logits[0], req.rng if req._rng is None else req._rng)
        self._free_slots.pop()
        req._tail = int(cache.tail.count[0])
        req.status, req.slot, req.kept = Status.RUNNING, slot, used
        req.kv_bytes = self.allocator.rounded(used) * self._slot_bytes
        self._running[slot] = req
        return True

    def _allocate(self, used: int):
        """A pool block of `used` slots, compacting the pool first when only fragmentation
        stands in the way (`BlockAllocator.compact`, `move_blocks`); None when it does not
        fit."""
        block = self.allocator.allocate(used)
        if block is None and self.allocator.fits_compacted(used):
            moved = self.allocator.compact()
            if moved:
                src, delta = compaction_moves(
                    self.allocator.n_slots, self.max_running, moved,
                    {slot: req.block for slot, req in self._running.items()})
                self._state = dataclasses.replace(
                    self._state, cache=move_blocks(self._state.cache, src, delta))
                self._compactions += 1
            block = self.allocator.allocate(used)
        return block

    def _prepare(self, req: Request):
        """(batch-1 cache with a packed store, logits [1, V]) of a request not yet placed:
        prefilled and compressed (or a copy of its compressed context), its question fed, and
        for a resumed request its generated tokens too; absorbed into the store when they
        would not fit the pool's tail."""
        if req.context is not None:
            cache, logits = jax.tree.map(jnp.copy, req.context.cache), req.context.logits
        else:
            logits, cache = prefill_request(self.fn, self.params, req.plan)
        fed = list(req.question_ids) + list(req.tokens)
        cache, logits = self._feed(cache, logits, fed)
        if len(fed) < self.max_tail:
            return dataclasses.replace(cache, store=compact_store(cache.store)), logits
        return self._absorbed(cache), logits

    def _absorbed(self, cache):
        """A batch-1 cache with its tail moved into its store (packed), tail empty."""
        per_row = self._shapes["n_layers"] * self._shapes["n_kv"] // self._shapes["rows"]
        need = int(used_slots(cache.store)) + per_row * int(cache.tail.count[0])
        width = 1 << max(need - 1, 63).bit_length()  # power-of-two buckets: few compilations
        return absorb_tail(cache, width=width)

    def _grow(self, req: Request) -> None:
        """Move a running request's full tail into a new, larger pool block (its segments
        extended by the tail's tokens), preempting the newest other requests while the pool
        cannot hold it; a request that cannot grow even alone ends with an error."""
        slot = req.slot
        per_row = self._shapes["n_layers"] * self._shapes["n_kv"] // self._shapes["rows"]
        width = 1 << max(req.kept + per_row * req._tail - 1, 63).bit_length()
        cache = absorb_tail(slot_cache(self._state.cache, jnp.int32(slot), width=width),
                            width=width)
        used = int(used_slots(cache.store))
        self._drop_block(req)  # copied out: its old block is free for the new one
        block = self._allocate(used)
        while block is None:
            victims = [r for r in self._running.values() if r is not req]
            if not victims:
                req.error = (f"its kept entries and generated tokens need {used} pool slots "
                             f"per row; the pool has {self.allocator.n_slots} (raise "
                             "kv_budget)")
                self._finish(req, "error")
                return
            self._preempt(max(victims, key=lambda r: r.id))
            block = self._allocate(used)
        self._state = dataclasses.replace(
            self._state, cache=write_block(self._state.cache, cache.store,
                                           jnp.int32(block.start), jnp.int32(used)))
        self._state = dataclasses.replace(
            self._state, cache=attach(self._state.cache, cache, jnp.int32(slot),
                                      jnp.int32(block.start)))
        req.block, req.kept, req._tail = block, used, 0
        req.kv_bytes = self.allocator.rounded(used) * self._slot_bytes

    def _preempt(self, req: Request) -> None:
        """Take a running request out of the pool (slot and block freed now) and put it back
        first in line; it resumes by recompute with the tokens it has (`_prepare`)."""
        req._rng = self._state.rng[req.slot]
        self._state = dataclasses.replace(
            self._state, cache=detach(self._state.cache, jnp.int32(req.slot)))
        del self._running[req.slot]
        self._free_slots.append(req.slot)
        self._drop_block(req)
        req.slot, req.status, req._pending = None, Status.WAITING, None
        req.preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(req)

    def _drop_block(self, req: Request) -> None:
        """Release `req`'s pool block (a shared context's entry goes with its last user)."""
        if req.block is None:
            return
        shared = req.context is not None and \
            self._contexts.get(id(req.context), (None, None))[1] is req.block
        if self.allocator.release(req.block) and shared:
            self._contexts.pop(id(req.context), None)
        req.block = None

    def _feed(self, cache, logits, ids):
        """(cache, logits [1, V]) after token ids fed in one extend (the tail grown to hold
        them), as `Pipeline.append_tokens` feeds a question."""
        if not ids:
            return cache, logits
        need = bucket_length(int(cache.tail.count[0]) + len(ids), minimum=16)
        if cache.tail.capacity < need:
            cache = with_tail(cache, need)
        width = bucket_length(len(ids), minimum=16)
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids)] = ids
        logits, cache = extend(self.fn, self.params, jnp.asarray(padded),
                               jnp.array([len(ids)], jnp.int32), cache,
                               attn_impl=self.attn_impl)
        return cache, logits

    def _context_block(self, ctx):
        """The pool block holding `ctx`'s store (written once, shared, packed by
        `compact_store`) -> (block or None when it does not fit yet, packed store)."""
        if id(ctx) in self._contexts:
            _, block, store = self._contexts[id(ctx)]
            block.refs += 1
            return block, store
        store = compact_store(ctx.cache.store)
        used = int(used_slots(store))
        block = self._allocate(used)
        if block is None:
            return None, store
        self._state = dataclasses.replace(
            self._state, cache=write_block(self._state.cache, store, jnp.int32(block.start),
                                           jnp.int32(used)))
        self._contexts[id(ctx)] = (ctx, block, store)
        return block, store

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot is not None:
            self._state = dataclasses.replace(
                self._state, cache=detach(self._state.cache, jnp.int32(req.slot)))
            del self._running[req.slot]
            self._free_slots.append(req.slot)
            req.slot = None
        self._drop_block(req)
        req._pending = None
        req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, \
            time.perf_counter()
        if self.tokenizer is not None and req.text is None:
            req.text = self.tokenizer.decode([t for t in req.tokens if t not in req.eos_ids])

    # -- user API ----------------------------------------------------------------------

    def warmup(self) -> int:
        """Compile the decode step now for every bucket of running slots (1, 2, 4, ... up to
        `max_running`) and the samplers seen so far, so no request waits for a compilation
        later; the state does not change (every slot takes part inactive). -> buckets."""
        sizes = sorted({min(self.max_running, 1 << k)
                        for k in range((self.max_running - 1).bit_length() + 1)})
        for b in sizes:
            _, self._state, _ = decode_slots(
                self.fn, self.params, self._state, jnp.arange(b, dtype=jnp.int32),
                jnp.zeros(b, bool), jnp.zeros(b, jnp.int32),
                jnp.ones((b, MAX_TRACED), jnp.float32), samplers=tuple(self._samplers),
                attn_impl=self.attn_impl)
        return len(sizes)

    def hold(self, ctx: CompressedContext) -> int:
        """Write `ctx`'s store into the pool now and keep it there until `release(ctx)`,
        however many requests use it meanwhile -> the pool slots it spans.

        Raises ValueError when it cannot join the pool or no free block is large enough."""
        if not isinstance(ctx, CompressedContext):
            raise TypeError(f"hold() takes a CompressedContext, not {type(ctx).__name__}")
        if id(ctx) in self._held:
            raise ValueError("this context is held already")
        self._check_context(ctx)
        block, store = self._context_block(ctx)
        if block is None:
            raise ValueError(f"no free block of {int(used_slots(store))} slots in the pool "
                             f"({self.allocator.free} of {self.allocator.n_slots} free)")
        self._held[id(ctx)] = ctx
        return block.size

    def release(self, ctx: CompressedContext) -> None:
        """Drop `hold(ctx)`: its block returns to the pool when no running request reads it."""
        if self._held.pop(id(ctx), None) is None:
            raise ValueError("this context is not held (hold(ctx) first)")
        _, block, _ = self._contexts[id(ctx)]
        if self.allocator.release(block):
            self._contexts.pop(id(ctx), None)

    def cancel(self, req: Request) -> None:
        """Cancel a waiting or running request: its slot and pool block are freed now."""
        if not isinstance(req, Request) or req._engine is not self:
            raise ValueError(f"{req!r} is not a request of this engine")
        if req.done:
            raise ValueError(f"request {req.id} is already finished ({req.finish_reason})")
        if req.status is Status.WAITING:
            self._waiting.remove(req)
        self._finish(req, "cancelled")

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self._waiting or self._running:
            self.step()

    def stream(self, req: Request):
        """Yield `req`'s tokens as they are generated (stepping the engine)."""
        sent = 0
        while True:
            while sent < len(req.tokens):
                sent += 1
                yield req.tokens[sent - 1]
            if req.done:
                return
            self.step()

    def shutdown(self) -> None:
        """Accept no more requests; cancel the waiting ones (running ones may finish)."""
        self._closed = True
        for req in list(self._waiting):
            self.cancel(req)

    def stats(self) -> EngineStats:
        tail_tokens = sum(len(r.question_ids) + len(r.tokens) for r in self._running.values())
        return EngineStats(
            running=len(self._running), waiting=len(self._waiting),
            pool_slots=self.allocator.n_slots, slots_used=self.allocator.used,
            slots_free=self.allocator.free, bytes_held=self._bytes_held,
            bytes_needed=self.allocator.used * self._slot_bytes
            + tail_tokens * self._tail_token_bytes,
            tokens_generated=self._generated, contexts_held=len(self._held),
            compactions=self._compactions, preemptions=self._preemptions)


__all__ = ["Engine", "EngineStats", "Request", "RequestResult", "parse_bytes"]
