"""A per-layer cache of expert rows in device slots, filled from host RAM on demand or ahead of need."""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from shared.schemas import ExpertCacheCounters
from worker.engine.moe_offload.config import CachePolicyName
from worker.engine.moe_offload.transfer import CopyStream, Landed


class LRUPolicy:
    """Evict the expert used longest ago."""

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def forget(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, protected: set[int]) -> int:
        return next(expert for expert in self._order if expert not in protected)

    def seen(self, expert: int) -> None:
        """A use served without a slot: recency counts only once the expert has one."""

    def admits(self, expert: int, protected: set[int]) -> bool:
        """Whether `expert` deserves the victim's slot: under LRU, always."""
        return True

    def admit(self, expert: int) -> None:
        """`expert`, `seen` this step, now has a slot."""
        self.touch(expert)


class LFUPolicy:
    """Evict the expert used least often, counts halved every `decay_every` uses so old habits fade."""

    def __init__(self, decay_every: int = 4096):
        self._counts: dict[int, float] = {}
        self._history: dict[int, float] = {}  # counts survive eviction: a popular expert comes back strong
        self._uses = 0
        self._decay_every = decay_every

    def touch(self, expert: int) -> None:
        self._counts[expert] = self._counts.get(expert, self._history.get(expert, 0.0)) + 1.0
        self._tick()

    def _tick(self) -> None:
        self._uses += 1
        if self._uses % self._decay_every == 0:
            self._counts = {e: c / 2 for e, c in self._counts.items()}
            self._history = {e: c / 2 for e, c in self._history.items()}

    def forget(self, expert: int) -> None:
        self._history[expert] = self._counts.pop(expert, 0.0)

    def victim(self, protected: set[int]) -> int:
        return min((e for e in self._counts if e not in protected), key=self._counts.__getitem__)

    def seen(self, expert: int) -> None:
        """A use served without a slot (read where it is): it counts towards earning one."""
        self._history[expert] = self._history.get(expert, 0.0) + 1.0
        self._tick()

    def admits(self, expert: int, protected: set[int]) -> bool:
        """Only an expert used more often than the one it would evict earns a copy (frequency-based admission:
        under flat routing the slots stop churning, under skewed routing the popular experts move in)."""
        return self._history.get(expert, 0.0) > self._counts[self.victim(protected)]

    def admit(self, expert: int) -> None:
        """`expert`, `seen` this step, now has a slot: its uses so far come with it."""
        self._counts[expert] = self._history.get(expert, 0.0)


def make_policy(name: CachePolicyName) -> LRUPolicy | LFUPolicy:
    return {"lru": LRUPolicy, "lfu": LFUPolicy}[name]()


@dataclass
class Acquired:
    """Where the requested experts are: hits are usable once `hits_ready` fires (set when a hit is a prefetch
    whose copy may still be on its way), misses once `misses_ready` fires."""

    hit_experts: list[int] = field(default_factory=list)
    hit_slots: list[int] = field(default_factory=list)
    miss_experts: list[int] = field(default_factory=list)
    miss_slots: list[int] = field(default_factory=list)
    hits_ready: Landed = None
    misses_ready: Landed = None
    copies_to_start: list[tuple[int, int]] = field(default_factory=list)  # (slot, expert), when deferred


class ExpertCache:
    """`slots` device rows for one layer's `host_rows` [experts, row_bytes]."""

    def __init__(
        self, host_rows: torch.Tensor, slots: int, device: torch.device, copier: CopyStream, policy: CachePolicyName
    ):
        num_experts, row_bytes = host_rows.shape
        if not 1 <= slots <= num_experts:
            raise ValueError(f"slots must be in 1..{num_experts}, got {slots}")
        self.host_rows = host_rows
        self.capacity = slots
        self.device = device
        self.copier = copier
        if slots == num_experts and host_rows.device == device:
            self.buffer = host_rows  # the CPU tier with room for all: use the host rows in place
        else:
            self.buffer = torch.empty((slots, row_bytes), dtype=torch.uint8, device=device)
        self.row_bytes = row_bytes
        self.stats = ExpertCacheCounters()
        self._policy = make_policy(policy)
        self._slot_of: dict[int, int] = {}
        self._free = list(range(slots - 1, -1, -1))
        self._prefetched: set[int] = set()  # prefetched, not used since: their copies may not have landed
        self._refilled: set[int] = set()  # copied in after a device decode step, not used since: likewise
        self._ahead_landed: Landed = None  # event after the latest copies made ahead of need (prefetches, refills)
        self._table_changes: list[tuple[int, int]] | None = None  # once `track_table`: (expert, slot or -1)
        # Compute event after which this layer's slots may be overwritten; at first, the work queued before the
        # buffer was allocated (its memory may have been freed by kernels still running).
        self._last_read = copier.compute_done()
        copier.adopt(self.buffer)
        if slots == num_experts:  # everything fits: load once, never miss
            self._fill_all()

    def _fill_all(self) -> None:
        if self.buffer is not self.host_rows:
            self.buffer.copy_(self.host_rows)
        for expert in range(self.capacity):
            self._slot_of[expert] = expert
            self._policy.touch(expert)
        self._free.clear()

    def holds(self, expert: int) -> bool:
        return expert in self._slot_of

    @property
    def rows_in_place(self) -> bool:
        """Every expert's slot is its host row (the CPU tier with room for all): nothing is ever copied."""
        return self.buffer is self.host_rows

    def record_read_in_place(self, count: int) -> None:
        """`count` experts were computed from their rows in place (hits: no copy was needed)."""
        self.stats.hits += count

    def record_computed_on_host(self, count: int) -> None:
        """`count` misses were computed where their rows are, not copied into slots."""
        self.stats.misses += count
        self.stats.computed_on_host += count

    def acquire(self, experts: list[int], start_copies: bool = True) -> Acquired:
        """Slots for `experts` (distinct, at most `capacity`), copying the missing ones in; with
        `start_copies=False` the copies wait for `start_copies(acquired)` (the caller has a small copy to send
        first, which would otherwise queue behind the rows on the bus)."""
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts requested at once, but the cache has {self.capacity} slots")
        protected = set(experts)
        result = Acquired()
        for expert in experts:
            slot = self._slot_of.get(expert)
            if slot is not None:
                self.stats.hits += 1
                if expert in self._prefetched:
                    self.stats.prefetch_hits += 1
                    self._prefetched.discard(expert)
                    result.hits_ready = self._ahead_landed
                elif expert in self._refilled:
                    self._refilled.discard(expert)
                    result.hits_ready = self._ahead_landed
                result.hit_experts.append(expert)
                result.hit_slots.append(slot)
            else:
                self.stats.misses += 1
                slot = self._assign_slot(expert, protected)
                result.miss_experts.append(expert)
                result.miss_slots.append(slot)
                result.copies_to_start.append((slot, expert))
            self._policy.touch(expert)
        if start_copies:
            self.start_copies(result)
        return result

    def record_gathered(self, rows: int) -> None:
        """A decode step on the device read `rows` expert rows from host RAM over the bus."""
        self.stats.bytes_gathered += rows * self.row_bytes

    def record_step(
        self, experts: list[int], hits: int, refills: int, gathered: torch.Tensor | None = None
    ) -> tuple[set[int], Landed]:
        """A decode step that ran on the device (`graph_decode`) used `experts`, `hits` of them from slots, the
        rest read where they are in host RAM: count them, and start copying up to `refills` of the experts
        without a slot into slots, the policy's victims' (after the step's reads), for later steps. With
        `gathered` (the step's gather scratch in device memory, row i holding `experts[i]`'s row wherever the
        step had no slot for it) a refill is a device-to-device copy from there, queued behind the step, and
        the row never crosses the bus again; without it, a copy from host RAM on the side stream. Returns the
        experts copied and the event their copies fire (None: landed, or ordered before anything queued
        later); nothing waits for it here."""
        self.mark_read()
        self.stats.hits += hits
        self.stats.misses += len(experts) - hits
        missed = []
        for expert in experts:
            if expert in self._slot_of:
                self._policy.touch(expert)
            else:
                self._policy.seen(expert)
                missed.append(expert)
        protected = set(experts)  # the step's own experts stay, whatever the policy says
        copies: list[tuple[int, int]] = []
        for expert in missed:
            if len(copies) == min(refills, self.capacity):
                break
            if self._free or (
                len(self._slot_of) > len(protected & self._slot_of.keys()) and self._policy.admits(expert, protected)
            ):
                copies.append((self._assign_slot(expert, protected), expert))
                self._policy.admit(expert)
        chosen = [expert for _, expert in copies]
        if not chosen:
            return set(), None
        if gathered is not None:
            position = {expert: index for index, expert in enumerate(experts)}
            self.copier.copy_on_device([(self.buffer[slot], gathered[position[expert]]) for slot, expert in copies])
            self.stats.bytes_copied_on_device += self.row_bytes * len(copies)
            self.mark_read()  # a later copy into these slots from host RAM waits for these
            return set(chosen), None
        self._copy_in(copies)
        self._refilled.update(chosen)  # the host path waits for them if it uses them first
        self._ahead_landed = self.copier.record()
        return set(chosen), self._ahead_landed

    def track_table(self) -> None:
        """From now on, keep (expert, its slot or -1) for every change of residence, for `drain_table_changes`,
        starting with where every resident expert is now."""
        self._table_changes = list(self._slot_of.items())

    def drain_table_changes(self) -> list[tuple[int, int]]:
        """The changes of residence since the last call (or `track_table`), oldest first."""
        changes, self._table_changes = self._table_changes or [], []
        return changes

    def start_copies(self, acquired: Acquired) -> None:
        if acquired.copies_to_start:
            self._copy_in(acquired.copies_to_start)
            acquired.misses_ready = self.copier.record()
        acquired.copies_to_start = []

    def prefetch(self, experts: list[int]) -> int:
        """Start copying in experts a token is likely to need soon; returns how many copies started."""
        protected = set(experts)
        copies = []
        for expert in experts:
            if expert in self._slot_of:
                continue
            if not self._free and all(e in protected for e in self._slot_of):
                break  # nothing left that may be evicted
            copies.append((self._assign_slot(expert, protected), expert))
            self._policy.touch(expert)
            self._prefetched.add(expert)
        self.stats.prefetched += len(copies)
        if copies:
            self._copy_in(copies)
            self._ahead_landed = self.copier.record()
        return len(copies)

    def _assign_slot(self, expert: int, protected: set[int]) -> int:
        """A free slot, or the policy's victim's, now recorded as `expert`'s (its bytes come with `_copy_in`)."""
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self._policy.victim(protected)
            slot = self._slot_of.pop(evicted)
            self._policy.forget(evicted)
            self._prefetched.discard(evicted)
            self._refilled.discard(evicted)
            self.stats.evictions += 1
            self._note_residence(evicted, -1)
        self._slot_of[expert] = slot
        self._note_residence(expert, slot)
        return slot

    def _note_residence(self, expert: int, slot: int) -> None:
        if self._table_changes is None:
            return
        self._table_changes.append((expert, slot))
        experts = self.host_rows.shape[0]
        if len(self._table_changes) > 2 * experts:  # undrained (an eager fallback): one entry per expert will do
            self._table_changes = [(e, self._slot_of.get(e, -1)) for e in range(experts)]

    def _copy_in(self, copies: list[tuple[int, int]]) -> None:
        """Bring each (slot, expert)'s row into its slot."""
        self.copier.copy(
            [(self.buffer[slot], self.host_rows[expert]) for slot, expert in copies], after=self._last_read
        )
        self.stats.bytes_copied += self.row_bytes * len(copies)

    def wait_hits(self, acquired: Acquired) -> None:
        self.copier.wait(acquired.hits_ready)

    def wait_misses(self, acquired: Acquired) -> None:
        self.copier.wait(acquired.misses_ready)

    def mark_read(self) -> None:
        """Call after issuing compute that reads slots: later copies into them wait for it."""
        self._last_read = self.copier.compute_done()
