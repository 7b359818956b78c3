"""Compressed contexts as a server resource: `POST /v1/contexts` compresses a document once,
chat requests naming its id are answered from it, `DELETE` releases it.

A context's store is held in the engine's pool from creation to deletion (`Engine.hold`), once
however many requests read it. With a directory, every context is saved there
(`CompressedContext.save`, its id as the folder name) and reloaded at start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import shutil
import time
from pathlib import Path

from kvjax.context import CompressedContext, read_info

ID = re.compile(r"ctx-[0-9a-f]{24}")
log = logging.getLogger("kvjax.serve")


@dataclasses.dataclass
class Entry:
    """A held context: its id, the context, the press that made it, pool slots and bytes."""

    id: str
    context: CompressedContext
    press: dict
    slots: int
    kv_bytes: int
    created: int

    def describe(self) -> dict:
        return {"id": self.id, "object": "kvjax.context", "created": self.created,
                "n_tokens": self.context.n_context, "kv_bytes": self.kv_bytes,
                "pool_slots": self.slots, **self.press}


class ContextStore:
    """id -> Entry. Every method runs on the engine thread (`EngineWorker.call`)."""

    def __init__(self, engine, model, directory: str | Path | None = None):
        self.engine, self.model = engine, model
        self.directory = None if directory is None else Path(directory)
        self._entries: dict[str, Entry] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def load_all(self) -> tuple[list[str], dict[str, str]]:
        """Hold every context saved in the directory (start-up) -> (ids loaded, {id: why}
        for those that cannot be: another model, a damaged checkpoint, no room in the pool;
        they stay on disk, and the server starts without them)."""
        ids, skipped = [], {}
        for path in sorted(self.directory.iterdir()) if self.directory else ():
            if not (path.is_dir() and ID.fullmatch(path.name)):
                continue
            try:
                ctx = CompressedContext.load(path, self.model)
                info = read_info(path)
                self._add(path.name, ctx, info.get("press", {"press": ctx.press}),
                          info.get("created", int(time.time())))
            except (ValueError, OSError) as err:
                skipped[path.name] = str(err)
                log.warning("context %s not loaded: %s", path.name, err)
                continue
            ids.append(path.name)
        return ids, skipped

    def create(self, text: str, press_spec) -> Entry:
        """Compress `text` (question-agnostic, as `Pipeline.compress`) and hold it."""
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        ctx = self.engine.compress(text, press=press_spec.build())
        cid, created = "ctx-" + secrets.token_hex(12), int(time.time())
        entry = self._add(cid, ctx, press_spec.describe(), created)
        if self.directory is not None:
            try:
                ctx.save(self.directory / cid, info={"press": entry.press, "created": created})
            except Exception:
                self.delete(cid)
                raise
        return entry

    def _add(self, cid: str, ctx: CompressedContext, press: dict, created: int) -> Entry:
        slots = self.engine.hold(ctx)
        entry = Entry(id=cid, context=ctx, press=press, slots=slots,
                      kv_bytes=slots * self.engine.slot_bytes, created=created)
        self._entries[cid] = entry
        return entry

    def get(self, cid: str) -> Entry:
        try:
            return self._entries[cid]
        except KeyError:
            raise KeyError(f"no context with id {cid!r}") from None

    def delete(self, cid: str) -> Entry:
        entry = self.get(cid)
        self.engine.release(entry.context)
        del self._entries[cid]
        if self.directory is not None and (self.directory / cid).exists():
            shutil.rmtree(self.directory / cid)
        return entry

    def list(self) -> list[Entry]:
        return list(self._entries.values())
