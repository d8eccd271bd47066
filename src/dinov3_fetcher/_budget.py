"""One budget of concurrent streams for a whole fetch (the head start included), and the rule that sizes it.

Every worker of every file holds a ``Slot`` while it streams; a slot carries the worker's read buffer, so
the buffers (and the connections) in use never outnumber the budget's limit, however many files run at once.

The limit adapts to the link (``Rule``): it starts at ``START`` streams (``LONG_START`` on a long round trip)
and grows while the aggregate throughput grows: after each step, once the new streams flow, windows of a few
round trips (at least ``MIN_WINDOW`` seconds) measure the rate; a gain over ``GAIN`` is worth another step
(doubling while the rate scales nearly in proportion, +50% otherwise), and a step that brought less is given
back. Where not even the first step paid and this process, not the link, sets the pace (localhost, a LAN, where
each stream costs CPU), it halves instead while the rate holds; where the link was full at the start, the
start's streams stay. A decision that lowers the streams for good (a step not worth it, a halving as good as
before) waits for ``CONFIRM`` windows that agree, so that one window made slow by the machine (a busy CPU, new
streams late to start) cannot leave a far link at half its rate; one that adds streams, or gives back a halving
that cost, needs one. The round trip comes from the requests' times to first byte (``_http.Answer.round_trips``).
Only windows in which every slot was wanted count (a file's tail, or the gap between files, says nothing about
the link).
``DINOV3_FETCHER_CONNECTIONS`` set explicitly fixes the limit instead (no adapting).
Why: BENCHMARKS.md (the links).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CAP", "CONFIRM", "LONG_RTT", "LONG_START", "START", "Budget", "Rule", "Slot"]

START = 8  # streams at first: a far link's first window already half full; fewer where this process sets the pace
LONG_START = 16  # ... where the round trip is at least LONG_RTT: each window of probing costs more there, and a
LONG_RTT = 0.1  # stream's own limit (TCP's window per round trip, a per-flow cap) more often leaves room for more
CONFIRM = 2  # windows that must agree before the limit goes down for good
CAP = 32  # never more streams than this for one fetch (aria2c with hfd.sh's flags opens up to 80)
GAIN = 0.10  # a step that raised the throughput by less than this is given back
MIN_WINDOW = 0.25  # seconds: the shortest measurement window
WINDOW_RTTS = 4  # ... else this many round trips (the shortest time to first byte seen)
SETTLE_RTTS = 2  # after a change, round trips before the next window starts (a new connection's handshake)
PIECE_RTTS = 30  # a piece lasts this many round trips at one stream's rate: the gap between pieces ~3%
PIECE_SPREAD = 0.25  # ... give or take this much, so that streams started together do not all idle at once
READ_AHEAD = 8 * 1024 * 1024  # all streams' reads under way together: a SIGKILL loses at most this (+ progress)
STEAL_RTTS = 4  # at a file's end an idle stream takes half of a busy piece down to this many round trips
LAST_STEAL_RTTS = 2  # ... this many where no other file waits for a stream (the fetch's last bytes)


@dataclass
class Rule:
    """The adaptive rule alone, fed throughput samples (bytes/s, one per window in which every slot was
    wanted); ``sample`` answers the next limit. No clock: it counts samples.

    Up: the first window is the baseline; a step that raised the rate by more than ``GAIN`` is worth another
    (doubling while the rate grew at least half as fast as the streams did, +50% otherwise); one that did not
    is given back. Down, only when no step up ever paid (the start's streams did as well as any more) and the
    window that decides says this process sets the pace (``process_bound``: a CPU-bound localhost or LAN, where
    each stream costs CPU): halve while the rate stays within ``GAIN`` of the start's, so that no more streams
    run than the rate needs; the first halving that costs more is given back. Where the link sets the pace
    (full at the start: a CDN edge, a small pipe), the start's streams stay: a halving there is measured at
    what half the streams carry (cdn: 4 streams capped at 40 MB/s on a 250 MB/s link) and saves nothing.

    Noise: "not worth it" and "as good with fewer" are believed after ``CONFIRM`` windows in a row say so (the
    best of them decides); one window that disagrees is enough to step up, or to give a halving back."""

    start: int = START
    cap: int = CAP
    fixed: bool = False  # a limit set by the user: never changed
    limit: int = 0
    done: bool = False  # settled: the limit stays
    base: float | None = None  # the rate measured before the last step
    before: int = 0  # the limit before the last step
    down: bool = False  # probing downwards (see above)
    paid: bool = False  # some step up raised the rate
    doubts: list[float] = field(default_factory=list)  # rates at this limit that argued for fewer streams so far

    def __post_init__(self) -> None:
        self.limit = max(1, min(self.start, self.cap))
        self.done = self.fixed or self.limit >= self.cap

    def start_long(self) -> None:
        """The round trip is long (``LONG_RTT``): start at ``LONG_START`` streams, if nothing was measured yet.

        Taken as a step up that paid, so the rule grows from there and gives back what does not pay, but does
        not probe below it: on such a link a window at half the streams costs seconds of half the rate (far:
        ~0.2 s of a 13 s fetch), for fewer flows on links that a few streams would fill."""
        if not self.fixed and self.base is None and self.limit < LONG_START:
            self.limit, self.paid = min(self.cap, LONG_START), True
            self.done = self.limit >= self.cap

    def sample(self, rate: float, wanted: int | None = None, process_bound: bool = True) -> int:
        """One window's aggregate rate at the current limit; returns the limit from now on. ``wanted``: the
        streams the fetch could run now (its files' workers); a step never goes above it, since streams that
        no worker wants would never be measured (the limit would stay there unjudged). ``process_bound``: in
        this window this process, not the link, set the pace (see ``Budget.split_cost``); only then are fewer
        streams than the start tried (the default, for a rule fed rates alone, tries them wherever no step
        paid)."""
        most = min(self.cap, wanted) if wanted is not None else self.cap
        if self.done:
            return self.limit
        if self.base is None:  # the first window: its rate is the baseline, and the first step doubles
            if self.limit >= most and self.limit > 1:  # no worker for more streams: fewer, or these stay
                if not process_bound:
                    self.base, self.done = rate, True
                    return self.limit
                self.base, self.before, self.down = rate, self.limit, True
                self.limit = max(1, self.limit // 2)
                return self.limit
            self._step(rate, most, double=True)
            return self.limit
        if self.down:
            if rate < (1 - GAIN) * self.base or self.limit <= 1:
                if rate < (1 - GAIN) * self.base:
                    self.limit = self.before  # that halving cost: give it back
                self.done = True
            elif self._confirmed(rate) is not None:
                self.before, self.limit = self.limit, max(1, self.limit // 2)  # as good with fewer: fewer still
            return self.limit
        gain = rate / self.base - 1 if self.base > 0 else math.inf
        if gain > GAIN:
            self.paid = True
            self.doubts.clear()
            # doubling while the rate grows at least half as fast as the streams did, +50% otherwise
            self._step(rate, most, double=gain >= 0.5 * (self.limit / self.before - 1))
        elif self._confirmed(rate) is None:
            pass  # one more window before the streams go down for good
        elif self.paid or self.before <= 1 or not process_bound:
            self.limit, self.done = self.before, True  # no gain worth the streams: the last step back, and stay
        else:  # not even the first step paid, and this process sets the pace: try fewer streams
            self.down = True
            self.limit, self.before = max(1, self.before // 2), self.before
        return self.limit

    def _confirmed(self, rate: float) -> float | None:
        """This window argues for fewer streams: the best rate of ``CONFIRM`` such windows in a row once there
        are that many (they all agree), else None (wait for the next)."""
        self.doubts.append(rate)
        if len(self.doubts) < CONFIRM:
            return None
        best = max(self.doubts)
        self.doubts.clear()
        return best

    def _step(self, rate: float, most: int, double: bool) -> None:
        self.doubts.clear()
        if self.limit >= most:
            self.done = True
            return
        self.base, self.before = rate, self.limit
        grown = self.limit * 2 if double else math.ceil(self.limit * 1.5)
        self.limit = min(most, max(self.limit + 1, grown))


@dataclass
class Slot:
    """A stream's right to run, with its read buffer; ``shed`` asks it to stop after its piece (the limit went
    down)."""

    budget: Budget
    buf: bytearray
    shedding: bool = False
    counted: bool = True  # one of the budget's streams (not a short request beside them: Budget.aside)

    def shed(self) -> bool:
        """True when this stream should end now (more streams run than the limit): asked between pieces, the
        caller takes no other piece and gives the slot back."""
        return self.counted and (self.shedding or self.budget.shed(self))

    def release(self) -> None:
        if self.counted:
            self.budget.release(self)


@dataclass
class Budget:
    """The streams of one fetch: a semaphore whose size the rule adjusts from the measured throughput."""

    rule: Rule = field(default_factory=Rule)
    block: int = 1024 * 1024  # read buffer per stream
    clock: Callable[[], float] = time.monotonic
    active: int = 0
    waiting: int = 0
    shedding: int = 0
    rtt: float | None = None  # the shortest time to first byte seen: one round trip, at best
    stream_rate: float | None = None  # the last window's rate per stream
    backlog: int | None = None  # the most bytes a stream found waiting in its socket after a read, last window
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _free: list[bytearray] = field(default_factory=list)
    _win_start: float | None = None
    _win_bytes: int = 0
    _settle_until: float = 0.0
    _queued: int = 0  # the most bytes a stream found waiting in its socket after a read, this window
    _pieces: int = 0  # pieces sized so far (see piece)
    _tickets: int = 0  # files that asked for streams so far (see ticket)
    _queue: dict[int, int] = field(default_factory=dict)  # ticket -> workers of that file waiting for a slot
    _flowing: bool = False  # the first bytes arrived (see add)

    @classmethod
    def for_connections(cls, connections: int | None, block: int) -> Budget:
        """Adaptive (START..CAP) when ``connections`` is None, else fixed at that many streams."""
        if connections is None:
            return cls(Rule(), block)
        return cls(Rule(start=connections, cap=connections, fixed=True), block)

    @property
    def limit(self) -> int:
        return self.rule.limit

    @property
    def cap(self) -> int:
        return self.rule.cap

    def ticket(self) -> int:
        """A file's place in line: a free slot goes to the waiting worker of the file that asked first."""
        with self._cond:
            self._tickets += 1
            return self._tickets

    def acquire(self, give_up: Callable[[], bool], ticket: int = 0) -> Slot | None:
        """A slot once fewer streams than the limit run and no worker of an earlier file (``ticket``) waits for
        one; None as soon as ``give_up()`` says so (asked outside the budget's lock: it may take the caller's
        own locks).

        Earlier files first: files in flight together then end one after another, each while the next ones
        already stream, instead of all at once with the link idle while the next ones start (and each file's
        sha256 tail overlaps the others' transfer)."""
        with self._cond:
            self.waiting += 1
            self._queue[ticket] = self._queue.get(ticket, 0) + 1
        buf: bytearray | None = None
        try:
            while True:
                if give_up():
                    return None
                with self._cond:
                    if self.rule.base is None and self.rtt is not None and self.rtt >= LONG_RTT:
                        self.rule.start_long()  # before the first window: nothing measured yet
                    if self.active < self.rule.limit and ticket <= min(self._queue):
                        self.active += 1
                        # as big as one read may be now: READ_AHEAD over all slots, not a block each (the
                        # resident set of 32 streams stays ~8 MiB of buffers, not 32)
                        buf = self._free.pop() if self._free else bytearray(min(self.block, self.read_size()))
                        break
                    self._cond.wait(0.1)
        finally:
            with self._cond:
                self.waiting -= 1
                self._queue[ticket] -= 1
                if not self._queue[ticket]:
                    del self._queue[ticket]
                    self._cond.notify_all()  # the next file's workers may be first in line now
                self._demand()
        return Slot(self, buf)

    def aside(self, size: int) -> Slot:
        """A slot beside the limit for a file of one read (a few KB of config): one short request, which would
        otherwise wait for a stream of the weights to end (they keep theirs from piece to piece)."""
        return Slot(self, bytearray(max(1, min(size, self.block))), counted=False)

    def release(self, slot: Slot) -> None:
        """The stream ended: its slot (and buffer) go to the next waiting worker."""
        with self._cond:
            self.active -= 1
            if slot.shedding:
                self.shedding -= 1
                slot.shedding = False
            if len(slot.buf) >= min(self.block, self.read_size()):  # one made for more streams is too small now
                self._free.append(slot.buf)
            del self._free[self.rule.limit:]
            self._demand()
            self._cond.notify_all()

    def shed(self, slot: Slot) -> bool:
        with self._cond:
            if self.active - self.shedding <= self.rule.limit:
                return False
            self.shedding += 1
            slot.shedding = True
            return True

    def read_size(self) -> int:
        """Bytes one read may take: the buffer, shrunk when many streams run so that all reads under way
        together stay within ``READ_AHEAD`` (what a SIGKILL costs besides the unrecorded progress)."""
        return max(64 * 1024, min(self.block, READ_AHEAD // max(1, self.rule.limit)))

    def first_byte(self, seconds: float) -> None:
        """A request's time to its answer's headers per round trip it took (a new connection's handshake and
        the redirects count: ``_http.Answer.round_trips``): the shortest is the round trip."""
        with self._cond:
            if self.rtt is None or seconds < self.rtt:
                self.rtt = seconds

    def piece(self, smallest: int, largest: int, rtts_times: int = 1) -> int:
        """The size of a piece: ``PIECE_RTTS`` round trips at one stream's rate (``rtts_times`` as many where a
        request costs more than its round trip), so that the round trip a stream idles between two pieces is a
        small part of each; within [smallest, largest].

        Spread by up to ``PIECE_SPREAD`` either way (a low-discrepancy sequence: deterministic, evenly spread):
        streams that started together (a step of the limit) would otherwise end their pieces together and all
        idle the same round trip before the next, which a far link saw as its rate falling by half for a
        quarter of a second every few seconds (BENCHMARKS.md)."""
        return self._rtts(PIECE_RTTS * rtts_times * self.spread(), smallest, largest, unknown=smallest)

    def spread(self) -> float:
        """The next factor within 1 +- ``PIECE_SPREAD`` (see ``piece``)."""
        with self._cond:
            self._pieces += 1
            return 1 + PIECE_SPREAD * (2 * ((self._pieces * 0.6180339887498949) % 1.0) - 1)

    def alone(self, ticket: int) -> bool:
        """No worker of another file than ``ticket``'s waits for a stream: a stream this file leaves idle has
        nothing else to do."""
        with self._cond:
            return all(t == ticket for t in self._queue)

    def steal(self, smallest: int, largest: int, ticket: int) -> int:
        """The smallest piece worth splitting off a busy one at a file's end (the victim's connection is
        closed and reopened, the thief asks anew: a few round trips): ``STEAL_RTTS`` round trips of one
        stream, within [smallest, largest]. Smaller ends let the last bytes come over many streams.

        Where no worker of another file than ``ticket``'s waits for a stream, a stream the file's end leaves
        idle has nothing else to do (the fetch's last bytes): ``LAST_STEAL_RTTS``, so that the last pieces
        end together instead of one stream carrying the last second alone."""
        return self._rtts(LAST_STEAL_RTTS if self.alone(ticket) else STEAL_RTTS, smallest, largest, unknown=largest)

    def split_cost(self) -> int | None:
        """What splitting a busy piece at a file's end costs: how far its server may already have sent past the
        split when the busy stream, having read up to it, closes its connection (served twice once the idle
        stream asks for it); None where a split cannot save time.

        Where the streams find bytes waiting in their sockets after a read (the most in this window or the last:
        more than a read takes and than a round trip of a stream's bytes), this process, not the link, sets their
        pace (localhost, a LAN on 2 cores): another connection brings nothing sooner, and the server is as far
        ahead as both kernels' buffers allow (megabytes), so no split. Where they do not (the link sets the
        pace), the server is ahead by what waits in the socket, what is on the wire (a round trip of the
        stream's bytes) and about as much in its send buffer, which its kernel sizes to the congestion window."""
        with self._cond:
            queued = max(self.backlog or 0, self._queued)
            if self._process_bound(queued):
                return None
            return queued + 2 * self._wire()

    def _wire(self) -> int:
        """A round trip of one stream's bytes at the last window's rate (under the lock): what is on the wire."""
        rtt, rate = self.rtt, self.stream_rate
        return int(rate * rtt) if rate is not None and rtt is not None else 0

    def _process_bound(self, queued: int) -> bool:
        """Under the lock: with ``queued`` bytes found waiting in a socket after a read, this process, not the
        link, sets the streams' pace: more than a read takes and than a round trip of a stream's bytes."""
        return queued > max(self._wire(), self.read_size())

    def _rtts(self, n: float, smallest: int, largest: int, unknown: int) -> int:
        """``n`` round trips' worth of one stream's bytes, within [smallest, largest]; ``unknown`` before the
        first measurement."""
        with self._cond:
            rtt, rate = self.rtt, self.stream_rate
        if rtt is None or rate is None:
            return unknown
        return int(min(largest, max(smallest, rate * rtt * n)))

    def add(self, n: int, queued: int = 0) -> None:
        """``n`` bytes arrived on some stream (``queued``: the bytes still waiting in its socket, see
        ``split_cost``): the measurement windows, and the rule's decision after each. Once the rule has settled,
        the windows go on for the rate per stream, which sizes the pieces (the last window of the rule may have
        had twice the streams that run now)."""
        now = self.clock()
        with self._cond:
            self._queued = max(self._queued, queued)
            if not self._flowing:  # the first streams start as a step's new ones do: let them all flow first
                self._flowing, self._settle_until = True, now + SETTLE_RTTS * (self.rtt or 0.0)
            if now < self._settle_until:
                return
            if self._win_start is None:
                # a window opens only while every slot is wanted, and no stream above a lowered limit still
                # finishes its piece (the window would count it)
                if self.active + self.waiting >= self.rule.limit >= self.active:
                    self._win_start, self._win_bytes = now, 0
                return
            self._win_bytes += n
            span = now - self._win_start
            if span < max(MIN_WINDOW, WINDOW_RTTS * (self.rtt or 0.0)):
                return
            rate = self._win_bytes / span
            self._win_start = None
            self.stream_rate = rate / max(1, self.active)
            self.backlog, self._queued = self._queued, 0
            old = self.rule.limit
            new = self.rule.sample(rate, self.active + self.waiting, self._process_bound(self.backlog))
            if new != old:
                self._settle_until = now + SETTLE_RTTS * (self.rtt or 0.0)
                self._cond.notify_all()

    def _demand(self) -> None:
        """Under the lock, after any change: a window in which a slot was not wanted does not count (it ends
        there; the next opens once every slot is wanted again)."""
        if self.active + self.waiting < self.rule.limit:
            self._win_start = None
