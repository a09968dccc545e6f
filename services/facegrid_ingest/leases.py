"""Which replica processes which video source: leases in NATS key-value buckets.

Users with many cameras run more than one machine, and each camera must be read by exactly
one of them: two readers double every event, none misses them. DeepStream and Frigate
leave this to the operator. Here the replicas agree through two JetStream KV buckets:

- ``replicas``: each replica puts its id as a key every ``lease_s / 3``; the bucket's TTL
  (``max_age`` = ``lease_s``) removes the key of a replica that stopped.
- ``leases``: one key per (processor, source), whose value is the owner's replica id. It is
  taken with ``create`` (refused while someone holds it), kept with ``update(last=revision)``
  (refused once someone else took it or it expired, as the TTL removed it), and handed over
  with ``delete(last=revision)``. Each write starts the entry's age afresh (the TTL is the
  stream's max age, which counts from a message's own timestamp; tested).

Which replica should own a key is rendezvous (highest-random-weight) hashing over the live
replicas with sha256, with bounded loads (:func:`assign`): no replica gets more than
``ceil(keys / replicas)``, so the spread is even, and a replica that joins or leaves moves
about only the keys it gains or held. The replica that holds a key it should no longer own
releases it (the new owner is live, as owners are chosen among live replicas), and the new
owner takes it on its next round.

The revision (the stream sequence of the lease's last write) is the fencing token: every
revision of a lease is higher than every revision of earlier holders. Events record it, and
a replica stops publishing for a key as soon as ``renew`` returns None, or ``holds(key)``
turns False (no successful renewal within ``lease_s``, say while the server is unreachable).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from facegrid_ingest.kv import bucket_keys

log = logging.getLogger(__name__)

DEFAULT_REPLICAS_BUCKET = "facegrid_replicas"
DEFAULT_LEASES_BUCKET = "facegrid_leases"
_KEY_RE = re.compile(r"^[-_=a-zA-Z0-9]+(\.[-_=a-zA-Z0-9]+)*$")
_WRONG_LAST_SEQUENCE = (10071, 10164)
_STREAM_NAME_IN_USE = 10058


def lease_key(processor_id: str, source_token: str) -> str:
    """The lease key of a source of a processor (``source_token`` from the event log)."""
    return check_key(f"{processor_id}.{source_token}")


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid lease key: {key!r}")
    return key


def _weight(replica: str, key: str) -> bytes:
    return hashlib.sha256(f"{replica}\0{key}".encode()).digest()


def preferred_owner(key: str, replicas: Sequence[str]) -> str:
    """The replica that should own ``key`` on its own: the highest sha256 weight of
    (replica, key). Stable, and only keys of a replica that leaves or joins move."""
    if not replicas:
        raise ValueError("no replicas to choose from")
    return max(replicas, key=lambda replica: (_weight(replica, key), replica))


def assign(keys: Sequence[str], replicas: Sequence[str]) -> dict[str, str]:
    """The owner of every key: rendezvous hashing with bounded loads.

    Plain rendezvous hashing spreads keys evenly only on average: 12 keys over 3 replicas
    land 4 +- 1 each in only ~40% of cases (simulated). Here the (key, replica) pairs are
    taken by descending weight, and a replica that already has ``ceil(keys / replicas)``
    keys takes no more, so loads differ by at most one. A key still goes to its preferred
    owner unless that one is full; when a replica leaves or joins, its keys move, plus on
    average about one key that had spilled over (simulated: at most 3 of 12). Every
    replica computes the same answer from the same keys and replicas.
    """
    if not replicas:
        raise ValueError("no replicas to choose from")
    unique_keys = list(dict.fromkeys(keys))
    unique_replicas = sorted(set(replicas))
    capacity = -(-len(unique_keys) // len(unique_replicas))
    pairs = sorted(
        ((_weight(r, k), r, k) for k in unique_keys for r in unique_replicas), reverse=True
    )
    load = dict.fromkeys(unique_replicas, 0)
    owners: dict[str, str] = {}
    for _, replica, key in pairs:
        if key in owners or load[replica] >= capacity:
            continue
        owners[key] = replica
        load[replica] += 1
        if len(owners) == len(unique_keys):
            break
    return owners


@dataclass
class Assignment:
    """One reconcile round: the leases held afterwards (key -> revision), and the changes."""

    held: dict[str, int] = field(default_factory=dict)
    acquired: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)


class LeaseManager:
    """This replica's view of the source leases. ``start()``, then ``reconcile(keys)`` every
    ``interval_s`` (a third of the lease), and ``release_all()`` (or ``stop()``) on SIGTERM.
    """

    def __init__(
        self,
        js: JetStreamContext,
        replica_id: str,
        *,
        lease_s: float = 10.0,
        replicas_bucket: str = DEFAULT_REPLICAS_BUCKET,
        leases_bucket: str = DEFAULT_LEASES_BUCKET,
        storage: api.StorageType = api.StorageType.FILE,
        balanced: bool = True,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, not {lease_s}")
        self.js = js
        self.replica_id = check_key(replica_id)
        self.lease_s = lease_s
        self.replicas_bucket = replicas_bucket
        self.leases_bucket = leases_bucket
        self.storage = storage
        self.balanced = balanced
        self.held: dict[str, int] = {}
        # Monotonic time until which each held lease surely is ours: lease_s after the
        # request that wrote its revision was sent (the server's clock starts later).
        self.valid_until: dict[str, float] = {}
        self._replicas: KeyValue | None = None
        self._leases: KeyValue | None = None

    @property
    def interval_s(self) -> float:
        """How often to reconcile: three chances to renew before a lease runs out."""
        return self.lease_s / 3

    async def start(self) -> None:
        """Open (or create) the buckets and announce this replica."""
        self._replicas = await self._bucket(self.replicas_bucket)
        self._leases = await self._bucket(self.leases_bucket)
        await self.heartbeat()

    async def stop(self) -> None:
        """Hand everything over (as on SIGTERM)."""
        if self._leases is not None:
            await self.release_all()

    async def _bucket(self, name: str) -> KeyValue:
        try:
            bucket = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            config = api.KeyValueConfig(
                bucket=name, ttl=self.lease_s, history=1, storage=self.storage
            )
            try:
                bucket = await self.js.create_key_value(config)
            except nats.js.errors.APIError as err:
                if err.err_code != _STREAM_NAME_IN_USE:
                    raise
                bucket = await self.js.key_value(name)  # another replica was first
        ttl = (await bucket.status()).ttl
        if ttl != self.lease_s:
            log.warning(
                "bucket %s has a TTL of %ss, not the %ss lease of this replica",
                name,
                ttl,
                self.lease_s,
            )
        return bucket

    @property
    def replicas_kv(self) -> KeyValue:
        if self._replicas is None:
            raise RuntimeError("LeaseManager.start() was not called")
        return self._replicas

    @property
    def leases_kv(self) -> KeyValue:
        if self._leases is None:
            raise RuntimeError("LeaseManager.start() was not called")
        return self._leases

    # -- replicas -----------------------------------------------------------------------

    async def heartbeat(self) -> None:
        await self.replicas_kv.put(self.replica_id, self.replica_id.encode())

    async def live_replicas(self) -> list[str]:
        """The replicas whose heartbeat has not run out, sorted."""
        bucket = self.replicas_kv
        live = []
        for key in await bucket_keys(self.js, self.replicas_bucket):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await bucket.get(key)
                live.append(key)
        return live

    def preferred_owner(self, key: str, replicas: Sequence[str]) -> str:
        return preferred_owner(key, replicas)

    def owners(self, keys: Sequence[str], replicas: Sequence[str]) -> dict[str, str]:
        """Who should own each key: :func:`assign` (balanced) or, with ``balanced=False``,
        :func:`preferred_owner` for each key on its own."""
        if self.balanced:
            return assign(keys, replicas)
        return {key: preferred_owner(key, replicas) for key in keys}

    # -- leases -------------------------------------------------------------------------

    def holds(self, key: str) -> bool:
        """Whether this replica holds ``key`` for sure now: held, and renewed within the
        lease (publishing must stop once this is False, even if ``renew`` could not tell)."""
        return key in self.held and time.monotonic() < self.valid_until.get(key, 0.0)

    def _keep(self, key: str, revision: int, sent: float) -> None:
        self.held[key] = revision
        self.valid_until[key] = sent + self.lease_s

    def _drop(self, key: str) -> None:
        self.held.pop(key, None)
        self.valid_until.pop(key, None)

    async def acquire(self, key: str) -> int | None:
        """Take a free lease: its revision, or None if another replica holds it."""
        sent = time.monotonic()
        try:
            revision = await self.leases_kv.create(check_key(key), self.replica_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except nats.js.errors.APIError as err:
            if err.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        self._keep(key, revision, sent)
        return revision

    async def renew(self, key: str, revision: int) -> int | None:
        """Extend a held lease: the new revision, or None if it was lost (taken or expired)."""
        sent = time.monotonic()
        try:
            new = await self.leases_kv.update(
                check_key(key), self.replica_id.encode(), last=revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            if self.held.get(key) == revision:
                self._drop(key)
            return None
        self._keep(key, new, sent)
        return new

    async def release(self, key: str, revision: int) -> bool:
        """Free a held lease at once (a hand-over); False if it was no longer ours."""
        if self.held.get(key) == revision:
            self._drop(key)
        try:
            await self.leases_kv.delete(check_key(key), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.APIError as err:
            if err.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def take_over(self, key: str) -> int | None:
        """Take a lease another replica holds (a PushFrames stream moved here): its new
        revision, or None if it changed hands meanwhile. The old holder finds out at its
        next renewal, which fails on the revision, and stops."""
        for _ in range(3):
            holder = await self.owner(key)
            if holder is None:
                revision = await self.acquire(key)
                if revision is not None:
                    return revision
                continue
            sent = time.monotonic()
            try:
                new = await self.leases_kv.update(
                    check_key(key), self.replica_id.encode(), last=holder[1]
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except nats.js.errors.APIError as err:
                if err.err_code in _WRONG_LAST_SEQUENCE:
                    continue
                raise
            self._keep(key, new, sent)
            return new
        return None

    async def owner(self, key: str) -> tuple[str, int] | None:
        """The holder of a lease and its revision, or None if it is free."""
        try:
            entry = await self.leases_kv.get(check_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.revision is None:
            return None
        return (entry.value or b"").decode(), entry.revision

    # -- the control loop ---------------------------------------------------------------

    async def reconcile(self, keys: Sequence[str]) -> Assignment:
        """One round of the control loop (run it every ``interval_s``).

        Heartbeat; compute the owner of every key among the live replicas (:meth:`owners`);
        renew the leases this replica should keep; release those that another live replica
        should own now (a hand-over to a replica that joined: it takes them on its next
        round) and those of keys that went away; take the free ones this replica should
        own. A key whose owner died becomes free when its lease runs out, and the dead
        replica drops out of the live set when its heartbeat does, so the key's new owner
        is a live replica, which takes it over.
        """
        await self.heartbeat()
        replicas = await self.live_replicas()
        if self.replica_id not in replicas:
            replicas = sorted([*replicas, self.replica_id])
        result = Assignment(replicas=replicas)
        wanted = list(dict.fromkeys(check_key(k) for k in keys))
        owners = self.owners(wanted, replicas) if wanted else {}
        for key, revision in list(self.held.items()):
            if owners.get(key) != self.replica_id:
                # Another live replica should own it (or the source went away).
                if await self.release(key, revision):
                    result.released.append(key)
                else:
                    result.lost.append(key)
            elif await self.renew(key, revision) is None:
                result.lost.append(key)
        for key in wanted:
            mine = key not in self.held and owners[key] == self.replica_id
            if mine and await self.acquire(key) is not None:
                result.acquired.append(key)
        result.held = dict(self.held)
        return result

    async def release_all(self) -> list[str]:
        """Hand over every lease and leave the replicas (others recompute at once)."""
        released = []
        for key, revision in list(self.held.items()):
            with contextlib.suppress(nats.errors.Error):
                if await self.release(key, revision):
                    released.append(key)
        self.held.clear()
        self.valid_until.clear()
        with contextlib.suppress(nats.errors.Error):
            # A purge of the subject leaves no delete marker behind, unlike kv.delete().
            await self.js.purge_stream(
                f"KV_{self.replicas_bucket}",
                subject=f"$KV.{self.replicas_bucket}.{self.replica_id}",
            )
        return released
