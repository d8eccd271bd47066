"""The stream budget: the adaptive rule fed throughput samples, the budget's windows on a fake clock, and one
budget for a whole fetch, head start included, counted at the emulator. No wall-clock assertions."""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import TINY
from dinov3_fetcher._budget import (
    CAP,
    CONFIRM,
    LAST_STEAL_RTTS,
    LONG_RTT,
    LONG_START,
    PIECE_RTTS,
    PIECE_SPREAD,
    READ_AHEAD,
    SETTLE_RTTS,
    START,
    STEAL_RTTS,
    WINDOW_RTTS,
    Budget,
    Rule,
)
from dinov3_fetcher._errors import FetchInterrupted
from dinov3_fetcher._http import Answer, HttpPool
from dinov3_fetcher._job import Job, Target
from dinov3_fetcher._progress import Progress
from dinov3_fetcher._retry import RetryPolicy
from dinov3_fetcher._state import StateDir
from dinov3_fetcher._transfer import Downloaded, Settings, Transfer
from helpers import fetch
from hub_server import HubServer
from net_fixtures import TlsHub

MB = 1_000_000


def feed(rule: Rule, rate_at: dict[int, float] | None = None, per_stream: float = 0.0, shared: float = 0.0,
         samples: int = 20, process_bound: bool = True) -> list[int]:
    """Feed ``samples`` windows of the rate a link gives at each limit; the limits chosen, in order.
    ``process_bound``: each window says this process, not the link, set the pace."""
    limits = [rule.limit]
    for _ in range(samples):
        n = rule.limit
        rate = rate_at[n] if rate_at is not None else min(per_stream * n, shared)
        new = rule.sample(rate, process_bound=process_bound)
        if new != limits[-1]:
            limits.append(new)
    return limits


def test_grows_while_the_rate_grows_and_gives_the_last_step_back() -> None:
    # far: 8 MB/s per connection, 100 MB/s shared: 8 -> 16 (100 MB/s) -> 32 (no gain) -> back to 16
    rule = Rule()
    assert feed(rule, per_stream=8 * MB, shared=100 * MB) == [8, 16, 32, 16]
    assert rule.done and not rule.down  # a step paid: no probing downwards
    # from 4 the same link: 4 -> 8 -> 16 -> 32 -> 16
    assert feed(Rule(start=4), per_stream=8 * MB, shared=100 * MB) == [4, 8, 16, 32, 16]
    # on a long round trip it starts at 16: the link is full at once; 32 bring nothing, so 16 stay
    rule = Rule()
    rule.start_long()
    assert feed(rule, per_stream=8 * MB, shared=100 * MB) == [16, 32, 16]
    assert rule.done and rule.limit == 16


def test_a_cpu_bound_link_stays_small() -> None:
    # localhost: the start's streams already take all the CPU; twice as many bring 3% (noise): no step paid,
    # so it halves while the rate holds (4 do as well), and gives back the halving that cost (2: -20%)
    rule = Rule()
    assert START == 8
    assert feed(rule, rate_at={8: 1000 * MB, 16: 1030 * MB, 4: 990 * MB, 2: 800 * MB}) == [8, 16, 4, 2, 4]
    assert rule.done and rule.limit == 4


def test_a_host_one_stream_keeps_busy_ends_with_one() -> None:
    # this process sets the pace, and one stream does as well as any more: no more than one stays
    rule = Rule()
    assert feed(rule, per_stream=1000 * MB, shared=50 * MB) == [8, 16, 4, 2, 1]
    assert rule.done and rule.limit == 1


@pytest.mark.parametrize(("per_stream", "shared"), [(40 * MB, 250 * MB), (1000 * MB, 50 * MB)], ids=["cdn", "pipe"])
def test_a_link_full_at_the_start_keeps_the_starts_streams(per_stream: float, shared: float) -> None:
    # cdn: 40 MB/s per connection, 250 MB/s shared: 8 streams fill it (320 > 250), 16 bring nothing, and 4
    # would carry 160. pipe: 50 MB/s, no cap per connection: 1 would do as well, but no faster. Where the link
    # sets the pace, the step is given back and no halving is tried: it would cost cdn a window at 4 streams.
    rule = Rule()
    assert feed(rule, per_stream=per_stream, shared=shared, process_bound=False) == [8, 16, 8]
    assert rule.done and rule.limit == START


def test_a_halving_that_costs_is_given_back() -> None:
    # this process sets the pace: 8 streams take all it has, 16 bring nothing, 4 lose
    rule = Rule()
    assert feed(rule, rate_at={8: 1000 * MB, 16: 1000 * MB, 4: 700 * MB}) == [8, 16, 4, 8]
    assert rule.done and rule.limit == 8


def test_grows_by_half_when_the_gain_is_less_than_proportional() -> None:
    # 4 -> 8 doubled the rate; 8 -> 16 gave +30% only (less than half of +100%): the next step is +50%
    rates = {8: 40 * MB, 16: 80 * MB, 32: 104 * MB, 48: 125 * MB, 72: 126 * MB}
    assert feed(Rule(cap=128), rate_at=rates) == [8, 16, 32, 48, 72, 48]


def test_never_above_the_cap() -> None:
    rule = Rule(cap=12)
    assert feed(rule, per_stream=8 * MB, shared=10_000 * MB) == [8, 12]
    assert rule.done and rule.limit == 12
    assert max(feed(Rule(), per_stream=1 * MB, shared=10_000 * MB)) == CAP


def test_a_step_never_goes_above_the_streams_the_files_want() -> None:
    # 6 shards, two files at a time (say) of 12 workers each: 24 streams at most are wanted. A step to 32 would never
    # see a window in which all its slots were wanted, and the limit would stay there, unjudged.
    rule = Rule()
    assert rule.sample(64 * MB, wanted=24) == 16
    assert rule.sample(100 * MB, wanted=24) == 24  # not 32
    assert rule.sample(100 * MB, wanted=24) == 24  # no gain: one more window before giving it back
    assert rule.sample(100 * MB, wanted=24) == 16 and rule.done  # confirmed: given back
    # one file of 8 pieces: no worker for a ninth stream, so no step up; where this process sets the pace, fewer
    # are tried instead
    alone = Rule()
    assert alone.sample(50 * MB, wanted=8) == 4
    assert alone.sample(50 * MB, wanted=4) == 4  # as fast with fewer: believed after a second window
    assert alone.sample(50 * MB, wanted=4) == 2  # as fast with fewer again: fewer still
    assert alone.sample(30 * MB, wanted=4) == 4 and alone.done  # that halving cost: given back at once
    linked = Rule()  # the same file where the link sets the pace: no halving is tried, the 8 stay
    assert linked.sample(50 * MB, wanted=8, process_bound=False) == 8 and linked.done
    linked.start_long()  # a round trip measured long afterwards: the rule has settled, its start is history
    assert linked.limit == START and linked.done


def test_a_fixed_limit_never_moves() -> None:
    rule = Rule(start=3, cap=3, fixed=True)
    assert feed(rule, per_stream=8 * MB, shared=10_000 * MB) == [3]


def test_the_first_sample_only_sets_the_baseline() -> None:
    rule = Rule()
    assert CONFIRM == 2
    assert rule.sample(10 * MB) == 16  # no judgement yet: a first step
    assert rule.sample(10.5 * MB) == 16  # +5%: not worth it, if the next window agrees
    assert rule.sample(10.4 * MB) == 4  # it does: given back, and as no step paid, half the start is tried
    assert rule.sample(9.5 * MB) == 4
    assert rule.sample(9.6 * MB) == 2  # within 10% of the start's rate twice: fewer still
    assert rule.sample(5 * MB) == 4  # that halving cost: given back at once, and it stays (done)
    assert rule.sample(100 * MB) == 4 and rule.done


def test_one_slow_window_does_not_leave_a_far_link_at_half_its_rate() -> None:
    # far: the window at 16 streams comes out slow once (a busy CPU, new streams late to start). Judged on that
    # window alone the step "did not pay", the rule would go down and settle at 8 (64 of 100 MB/s).
    slow_once = iter([64 * MB, 66 * MB, 100 * MB, 100 * MB, 100 * MB, 100 * MB, 100 * MB])
    rule = Rule()
    limits = [rule.limit]
    for rate in slow_once:
        if (new := rule.sample(rate)) != limits[-1]:
            limits.append(new)
    assert limits == [8, 16, 32, 16] and rule.done  # the next window at 16 showed the gain: up it went
    # every single window may be slow once, in any place: the rule never ends below 16 on far
    for k in range(1, 8):
        rule = Rule()
        for i in range(12):
            fair = min(8 * MB * rule.limit, 100 * MB)
            rule.sample(fair * (0.6 if i == k else 1.0))
        assert rule.limit >= 16, k


def test_one_fast_window_does_not_take_streams_from_a_full_link() -> None:
    # this process sets the pace: 8 streams take all it has; a halving to 4 costs. One lucky window at 4 (bytes
    # that waited in socket buffers) must not be read as "as good with fewer": the next window gives it back.
    rates = {8: 250 * MB, 16: 250 * MB, 4: 160 * MB}
    rule = Rule()
    limits = [8]
    lucky = True
    for _ in range(10):
        rate = rates[rule.limit]
        if rule.limit == 4 and lucky:
            rate, lucky = 240 * MB, False
        if (new := rule.sample(rate)) != limits[-1]:
            limits.append(new)
    assert limits == [8, 16, 4, 8] and rule.done


def test_a_long_round_trip_starts_with_more_streams_a_fixed_limit_never() -> None:
    far = Budget(Rule(), block=16)
    assert far.limit == START
    far.first_byte(LONG_RTT * 1.5)  # the first answers (the HEADs) took long: a far link
    slots = [far.acquire(lambda: False) for _ in range(LONG_START)]
    assert all(s is not None for s in slots) and far.limit == LONG_START and far.active == LONG_START
    near = Budget(Rule(), block=16)
    near.first_byte(LONG_RTT / 3)
    assert near.acquire(lambda: False) is not None and near.limit == START
    fixed = Budget.for_connections(3, 16)
    fixed.first_byte(LONG_RTT * 3)
    assert fixed.acquire(lambda: False) is not None and fixed.limit == 3
    measured = Rule()
    measured.sample(50 * MB)  # a window was judged already: the start is history
    measured.start_long()
    assert measured.limit == 2 * START


def test_pieces_follow_the_rate_per_stream_after_the_rule_settles() -> None:
    # far: 16 -> 32 (no gain, twice) -> back to 16. The last windows of the rule ran 32 streams at 3.1 MB/s each;
    # from then on 16 run at 6.25 MB/s each, and a piece of 30 round trips is twice what the last rule window said.
    clock = Clock()
    rule = Rule()
    rule.start_long()  # a far link: 16 from the start
    b = Budget(rule, block=16, clock=clock)
    b.first_byte(0.05)
    slots = [b.acquire(lambda: False) for _ in range(16)]
    b.waiting = 16  # as if 16 more workers waited: 32 are wanted

    def window(rate: float) -> None:
        clock.now += 1.0  # past any settling
        b.add(1)  # opens a window
        clock.now += 1.0
        b.add(int(rate))  # ... which ends: this rate

    b.add(1)  # the first bytes
    assert b.limit == 16
    window(100 * MB)  # 16 streams: the baseline, then a step to 32
    assert b.limit == 32
    b.active, b.waiting = 32, 0
    window(100 * MB)
    window(100 * MB)  # no gain, twice: back to 16, and the rule is done
    assert b.limit == 16 and b.rule.done and b.stream_rate == pytest.approx(100 * MB / 32)
    b.active = 16
    window(100 * MB)
    assert b.stream_rate == pytest.approx(100 * MB / 16)  # measured again at 16 streams
    assert b.limit == 16 and all(s is not None for s in slots)


@pytest.mark.parametrize(("queued", "settled"), [(64 * 1024, START), (8 * MB, START // 2)],
                         ids=["the-link-sets-the-pace", "this-process-sets-the-pace"])
def test_fewer_streams_than_the_start_are_tried_only_where_this_process_sets_the_pace(queued: int,
                                                                                     settled: int) -> None:
    # 8 streams give 250 MB/s, 16 no more. Where the streams find their sockets all but empty after each read (the
    # link sets the pace: a CDN edge), the step is given back and the 8 stay; where megabytes wait after each read
    # (this process sets the pace: localhost on 2 cores), half the start is tried.
    clock = Clock()
    b = Budget(Rule(), block=MB, clock=clock)
    b.first_byte(0.03)
    slots = [b.acquire(lambda: False) for _ in range(START)]
    b.waiting = 24  # as if 24 more workers waited: 32 are wanted

    def window(rate: float) -> None:
        clock.now += 1.0  # past any settling
        b.add(1)  # opens a window
        clock.now += 1.0
        b.add(int(rate), queued)  # ... which ends: this rate, with this much found waiting after a read

    b.add(1)  # the first bytes
    window(250 * MB)  # the baseline: a step to 16
    assert b.limit == 2 * START
    b.active, b.waiting = 2 * START, 2 * START
    window(250 * MB)
    window(250 * MB)  # no gain, twice
    assert b.limit == settled
    assert b.rule.done == (settled == START) and all(s is not None for s in slots)


def test_pieces_of_streams_started_together_do_not_end_together() -> None:
    # far: 6.25 MB/s per stream, 150 ms: a piece is ~30 round trips (28 MB). Sixteen streams that took their
    # pieces at once would all idle the same round trip before the next; spread sizes spread those gaps.
    b = Budget(Rule(), block=16)
    assert b.piece(16 * MB, 64 * MB) == 16 * MB  # nothing measured yet: the smallest
    b.rtt, b.stream_rate = 0.15, 6.25 * MB
    sizes = [b.piece(1 * MB, 256 * MB) for _ in range(16)]
    nominal = 6.25 * MB * 0.15 * PIECE_RTTS
    assert all((1 - PIECE_SPREAD) * nominal - 1 <= x <= (1 + PIECE_SPREAD) * nominal + 1 for x in sizes)
    ends = sorted(x / (6.25 * MB) for x in sizes)  # when each piece ends, in seconds
    assert min(later - earlier for earlier, later in itertools.pairwise(ends)) > 0.05  # no two together
    assert abs(sum(sizes) / len(sizes) / nominal - 1) < 0.05  # the same size on average
    assert all(b.piece(16 * MB, 20 * MB) in range(16 * MB, 20 * MB + 1) for _ in range(8))  # still within bounds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_decides_once_per_full_window_and_waits_for_new_streams() -> None:
    clock = Clock()
    b = Budget(Rule(start=4), block=16, clock=clock)
    b.first_byte(0.0625)  # window: WINDOW_RTTS round trips; settle: SETTLE_RTTS round trips
    window, settle = WINDOW_RTTS * 0.0625, SETTLE_RTTS * 0.0625
    slots = [b.acquire(lambda: False) for _ in range(4)]
    assert all(s is not None for s in slots) and b.active == 4
    b.add(1)  # the first bytes: the first streams get SETTLE_RTTS round trips to flow, as a step's new ones do
    clock.now += settle - 0.01
    b.add(100 * MB)
    assert b._win_start is None  # still settling: not measured
    clock.now += 0.01
    b.add(1)  # opens a window (every slot in use)
    clock.now += window - 0.125
    b.add(MB)
    assert b.limit == 4  # no decision before the window's end
    clock.now += 0.125
    b.waiting = 4  # as if four more workers waited for a slot: 8 streams are wanted, so the step can go to 8
    b.add(MB)
    b.waiting = 0
    assert b.limit == 8
    # the new streams need round trips to flow: bytes until the settling ends are not measured
    clock.now += settle - 0.125
    b.add(100 * MB)
    assert b._win_start is None
    # no window while fewer workers want a slot than the limit (4 active, none waiting: 8 not all wanted)
    clock.now += 0.125
    b.add(1)
    clock.now += window
    b.add(100 * MB)
    assert b.limit == 8 and b._win_start is None  # no decision
    more = [b.acquire(lambda: False) for _ in range(4)]
    b.add(1)  # all 8 wanted: a window opens
    assert b._win_start is not None
    assert more[0] is not None
    more[0].release()  # a slot not wanted: the window ends at once, uncounted
    assert b._win_start is None
    clock.now += window
    b.add(100 * MB)
    assert b.limit == 8


def test_budget_sheds_streams_above_a_lowered_limit() -> None:
    b = Budget(Rule(start=4, cap=4, fixed=True), block=16)
    slots = [b.acquire(lambda: False) for _ in range(4)]
    assert b.acquire(lambda: True) is None  # full: a worker that gives up gets nothing
    assert not any(s.shed() for s in slots if s is not None)
    b.rule.limit = 2
    assert [s.shed() for s in slots if s is not None] == [True, True, False, False]
    for s in slots[:2]:
        assert s is not None
        s.release()
    assert b.active == 2 and b.shedding == 0
    assert len(b._free) == 2  # buffers kept for reuse, never more than the limit


def test_reads_under_way_stay_within_the_read_ahead_however_many_streams() -> None:
    b = Budget(Rule(), block=1024 * 1024)
    for limit in (1, 4, 8, 16, 32):
        b.rule.limit = limit
        assert b.read_size() <= 1024 * 1024
        assert limit * b.read_size() <= max(READ_AHEAD, limit * 64 * 1024)
    b.rule.limit = 4
    assert b.read_size() == 1024 * 1024  # few streams (localhost): full 1 MiB reads, as measured
    # the buffers are as big as a read may be when they are made: 32 streams hold READ_AHEAD, not 32 blocks
    b = Budget(Rule(start=32, cap=32, fixed=True), block=1024 * 1024)
    slots = [b.acquire(lambda: False) for _ in range(32)]
    assert sum(len(s.buf) for s in slots if s is not None) == READ_AHEAD


def test_a_waiting_worker_gets_the_released_slot() -> None:
    b = Budget(Rule(start=1, cap=1, fixed=True), block=16)
    first = b.acquire(lambda: False)
    assert first is not None
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(b.acquire(lambda: False)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and got == []
    first.release()
    t.join(5)
    assert got and got[0] is not None and got[0].buf is first.buf  # type: ignore[attr-defined]


def test_the_fetchs_last_bytes_are_split_finer_than_a_file_end_that_other_files_wait_behind() -> None:
    # far: 8 MB/s per stream, 150 ms. While another file's worker waits for a stream, a stream that a file's end
    # leaves idle goes on to it, and splits a busy piece only down to STEAL_RTTS round trips; where none waits it
    # has nothing else to do, and splits down to LAST_STEAL_RTTS, so that the last pieces end together.
    b = Budget(Rule(start=1, cap=1, fixed=True), block=16)
    b.first_byte(0.15)
    b.stream_rate = 8 * MB
    mine, other = b.ticket(), b.ticket()
    assert b.steal(1, 64 * MB, mine) == int(8 * MB * 0.15 * LAST_STEAL_RTTS)
    held = b.acquire(lambda: False, mine)
    assert held is not None
    t = threading.Thread(target=lambda: b.acquire(lambda: False, other))
    t.start()
    while not b.waiting:
        time.sleep(0.01)
    assert b.steal(1, 64 * MB, mine) == int(8 * MB * 0.15 * STEAL_RTTS)
    held.release()
    t.join(5)
    assert not t.is_alive()
    assert b.steal(1, 64 * MB, other) == int(8 * MB * 0.15 * LAST_STEAL_RTTS)


def test_a_free_slot_goes_to_the_file_that_asked_first() -> None:
    # Two files in flight: the earlier one's workers get the streams first, so the files end one after another
    # (the next one already streaming) instead of together with the link idle while the next ones start.
    b = Budget(Rule(start=1, cap=1, fixed=True), block=16)
    first, second = b.ticket(), b.ticket()
    held = b.acquire(lambda: False, second)
    assert held is not None
    order: list[str] = []

    def stream(name: str, ticket: int) -> None:
        slot = b.acquire(lambda: False, ticket)
        assert slot is not None
        order.append(name)
        slot.release()

    later = threading.Thread(target=stream, args=("second", second))
    later.start()
    while b.waiting < 1:
        time.sleep(0.01)
    earlier = threading.Thread(target=stream, args=("first", first))
    earlier.start()
    while b.waiting < 2:
        time.sleep(0.01)
    held.release()
    earlier.join(5)
    later.join(5)
    assert order == ["first", "second"]
    # a file whose workers give up (no work left) does not hold the line
    gone = b.ticket()
    assert b.acquire(lambda: True, gone) is None
    assert b.acquire(lambda: False, second) is not None


def test_settings_fixed_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DINOV3_FETCHER_CONNECTIONS", raising=False)
    assert Settings.from_env().connections is None
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "3")
    assert Settings.from_env().connections == 3
    b = Budget.for_connections(3, 16)
    assert b.rule.fixed and b.limit == 3 and b.cap == 3
    assert not Budget.for_connections(None, 16).rule.fixed


class _Jobs:
    """A fetch observer that keeps each download's job, for tests that look at its answers."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def planned(self, plan: object) -> None:
        pass

    def started(self, name: str, size: int, sha256: str | None, download: Job) -> None:
        self.jobs.append(download)

    def verified(self, name: str, path: Path) -> None:
        pass


def _download(hub: HubServer, tmp_path: Path, budget: Budget, data: bytes, min_split: int, timeout: float = 10,
              retries: int = 5, observer: _Jobs | None = None
              ) -> tuple[Transfer, threading.Thread, list[Downloaded | BaseException]]:
    """``data`` as TINY's model.safetensors, downloaded over ``budget`` in a thread (started; ``got`` holds its
    result once it ends, or what it raised other than the FetchInterrupted of a cancel); ``timeout``: the reads'
    timeout; ``retries``: failed tries in a row before a piece gives up."""
    hub.add_repo(TINY, {"config.json": b"{}", "model.safetensors": data})
    state = StateDir(tmp_path / "root")
    state.ensure()

    def refuse(status: int, headers: dict[str, str], body: bytes, url: str) -> NoReturn:
        raise AssertionError(f"HTTP {status} from {url}")

    transfer = Transfer(replace(Settings(), min_split=min_split, retry=RetryPolicy(retries=retries)),
                        HttpPool(timeout, "test"), state,
                        Progress(quiet=True), refuse, budget=budget, observer=observer)
    sha = hashlib.sha256(data).hexdigest()
    target = Target("model.safetensors", f"{hub.endpoint}/{TINY}/resolve/main/model.safetensors", len(data), sha, sha)
    got: list[Downloaded | BaseException] = []

    def run() -> None:
        try:
            got.append(transfer.download(target))
        except FetchInterrupted:
            pass  # the test cancelled it
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return transfer, t, got


def _holds(span: str | None, offset: int) -> bool:
    """Whether a request's Range (``bytes=A-B``) or an answer's Content-Range (``bytes A-B/SIZE``) holds byte
    ``offset``."""
    m = re.match(r"bytes[= ](\d+)-(\d+)", span or "")
    return m is not None and int(m[1]) <= offset <= int(m[2])


def _cancel_while_held(hub: HubServer, tmp_path: Path, **fault: bool) -> Transfer:
    """A download whose piece at 3 MiB the server holds (the other stream takes the rest), cancelled once it is
    held; asserts that every stream's read ended while the server still holds that answer (the read timeout is
    600 s). Returns the cancelled transfer."""
    data = bytes(range(256)) * (8 * 4096)  # 8 MiB: 8 pieces of 1 MiB
    pause = 3 * 1024 * 1024
    hub.faults.add(path_suffix="model.safetensors", host="cdn", pause_at=pause, **fault)
    budget = Budget(Rule(start=2, cap=2, fixed=True), block=64 * 1024)
    before = set(threading.enumerate())
    # no retries: a read the cancel ended is no failed try, so the cancel ends as FetchInterrupted all the same
    seen = _Jobs()
    transfer, t, got = _download(hub, tmp_path, budget, data, min_split=1024 * 1024, timeout=600, retries=0,
                                 observer=seen)
    held: list[Answer] = []
    while not (hub.paused.is_set() and held):  # the server holds it, and a stream reads it
        assert t.is_alive()
        time.sleep(0.01)
        for job in seen.jobs:
            with job.lock:
                held = [a for a in job.reading if _holds(a.resp.getheader("Content-Range"), pause)]
    streams = [w for w in threading.enumerate() if w not in before and w.name.startswith("fetch-")]
    assert streams
    transfer.cancel.set()
    assert held[0].dead  # its read was ended as the cancel was set, not once the download noticed the cancel
    # A bound, to fail readably: a cut read ends at once, one left to the read timeout would run 600 s. Generous
    # (a loaded machine ends these threads in well under a second) and below pytest's own timeout (300 s), so that
    # a stream still reading fails here, named, rather than as a hang.
    deadline = time.monotonic() + 120
    for w in [t, *streams]:
        w.join(max(0.0, deadline - time.monotonic()))
    assert not t.is_alive() and not got, got
    assert not any(w.is_alive() for w in streams), [w.name for w in streams if w.is_alive()]
    # the server still holds the answer for the piece at the pause (picked by its range: another stream's answer
    # may not have noted its end yet): the reads ended on our side
    held = [r for r in hub.file_gets("model.safetensors") if r.status == 206 and _holds(r.range, pause)]
    assert len(held) == 1 and held[0].done is None, held
    return transfer


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_a_cancelled_download_ends_every_read_while_the_server_still_holds_the_answer(hub: HubServer,
                                                                                     tmp_path: Path,
                                                                                     close: bool) -> None:
    # Ctrl-C (the transfer's cancel) ends the streams' reads at once: no stream is left waiting for a server that
    # holds its answer, with its connection open, until the read timeout. Also an answer that closes its
    # connection (no Content-Length), whose socket http.client no longer keeps on the connection.
    _cancel_while_held(hub, tmp_path, no_content_length=close)


def test_a_connection_whose_read_a_cancel_ended_is_never_used_again(tls_hub: TlsHub, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The held stream's read ends as if the server had closed; its connection is dead and must be closed, not
    # pooled: over TLS the next request on it fails (SSLEOFError), which with no retries left fails a download.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    cancelled = _cancel_while_held(tls_hub.hub, tmp_path)
    data = bytes(range(251)) * 8192  # another file, on the same connection pool
    tls_hub.hub.add_commit(TINY, {"other.safetensors": data})
    sha = hashlib.sha256(data).hexdigest()
    target = Target("other.safetensors", f"{tls_hub.hub.endpoint}/{TINY}/resolve/main/other.safetensors", len(data),
                    sha, sha)
    again = Transfer(Settings.from_env(), cancelled.pool, cancelled.state, Progress(quiet=True), cancelled.raise_status)
    assert again.download(target).path.read_bytes() == data


def test_a_connection_whose_body_read_failed_is_never_used_again(tls_hub: TlsHub, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunked answer the server closes between two chunks: http.client closes the response before it raises, so
    # that it looks read to its end. Its connection is dead all the same: pooled, the next request on it fails over
    # TLS (SSLEOFError), a second failed try, which with one retry allowed fails the download.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB, one stream
    tls_hub.hub.faults.add(path_suffix="model.safetensors", host="cdn", chunked=True, cut_after=1024 * 1024, times=1)
    budget = Budget(Rule(start=1, cap=1, fixed=True), block=64 * 1024)
    transfer, t, got = _download(tls_hub.hub, tmp_path, budget, data, min_split=len(data), retries=1)
    t.join(60)
    transfer.pool.close()
    assert got and isinstance(got[0], Downloaded), got
    assert got[0].path.read_bytes() == data and got[0].resumed_from == 0
    cdn = [r for r in tls_hub.hub.file_gets("model.safetensors") if r.host == "cdn"]
    assert len(cdn) == 2 and cdn[1].range == f"bytes={1024 * 1024}-{len(data) - 1}"  # the rest, once


def test_a_shed_stream_ends_after_its_piece_so_no_byte_is_served_twice(hub: HubServer, tmp_path: Path) -> None:
    # 4 streams, then the limit falls to 2 while they are all mid-piece. A stream shed in the middle of an answer
    # closes its connection with the rest of that answer already sent (socket buffers, in flight): served twice
    # once another stream asks for it. Shed after its piece instead, every byte is served once.
    data = bytes(range(256)) * (8 * 4096)  # 8 MiB: 8 pieces of 1 MiB
    hub.faults.add(host="cdn", throttle_bps=4 * 1024 * 1024)  # slow enough for the four to be mid-piece
    budget = Budget(Rule(start=4, cap=4, fixed=True), block=64 * 1024)
    transfer, t, got = _download(hub, tmp_path, budget, data, min_split=1024 * 1024)
    while budget.active < 4 or hub.bytes_served("model.safetensors") < 1024 * 1024:
        assert t.is_alive()
        time.sleep(0.01)
    with budget._cond:
        budget.rule.limit = 2
    t.join(60)
    transfer.pool.close()
    assert got and isinstance(got[0], Downloaded) and got[0].path.read_bytes() == data
    assert hub.bytes_served("model.safetensors") == len(data)  # each byte served once
    gets = hub.file_gets("model.safetensors")
    assert len([r for r in gets if r.host == "cdn"]) == 8  # one answer per piece: none was cut and asked again


def test_a_busy_piece_is_not_split_where_its_bytes_wait_for_the_reader(hub: HubServer, tmp_path: Path) -> None:
    # Two streams, two pieces of 8 MiB over localhost; the second piece's answer is held 4 MiB in, so the first
    # stream ends its piece and is idle beside a busy one with 4 MiB left, halves worth a steal at this link's
    # rate and round trip. But the streams found megabytes waiting in their sockets after their reads (this
    # process, not the link, sets their pace, as on localhost or a LAN): a second connection brings nothing sooner,
    # and a split would close the busy one with the rest of its answer already sent (the socket buffers), served
    # twice. Left whole, every byte is served once. (The budget's quantities are set, and its clock stands
    # still so that no window replaces them: the decision does not depend on how fast this machine is.)
    mib = 1024 * 1024
    data = bytes(range(256)) * (16 * 4096)  # 16 MiB
    hub.faults.add(path_suffix="model.safetensors", host="cdn", pause_at=12 * mib)  # the answer that holds it
    budget = Budget(Rule(start=2, cap=2, fixed=True), block=64 * 1024, clock=lambda: 0.0)
    budget.rtt, budget.stream_rate = 1e-4, 1e8  # a fast link's: a steal is worth 1 MiB (STEAL_MIN)
    budget.backlog = 4 * mib  # the most a stream found waiting in its socket after a read
    transfer, t, got = _download(hub, tmp_path, budget, data, min_split=8 * mib)

    def idle_beside_the_held_piece_or_split() -> bool:
        gets = hub.file_gets("model.safetensors")
        first = [r for r in gets if r.host == "cdn" and r.range == f"bytes=0-{8 * mib - 1}" and r.done]
        # the held stream keeps its slot; the other gave its back (it found nothing to take), or took a split
        return (hub.paused.is_set() and bool(first) and budget.active == 1) or len(gets) > 4

    try:
        while not idle_beside_the_held_piece_or_split():
            assert t.is_alive()
            time.sleep(0.01)
    finally:
        hub.resume.set()
    t.join(60)
    transfer.pool.close()
    assert got and isinstance(got[0], Downloaded) and got[0].path.read_bytes() == data
    cdn = [r.range for r in hub.file_gets("model.safetensors") if r.host == "cdn"]
    assert sorted(r or "" for r in cdn) == [f"bytes=0-{8 * mib - 1}", f"bytes={8 * mib}-{16 * mib - 1}"]
    assert hub.bytes_served("model.safetensors") == len(data)  # each byte served once


def test_a_split_costs_what_the_server_may_have_sent_ahead_and_none_where_bytes_wait_for_the_reader() -> None:
    clock = Clock()
    b = Budget(Rule(start=2, cap=2, fixed=True), block=1024 * 1024, clock=clock)
    assert b.split_cost() == 0  # nothing measured: the steal's own size decides
    b.first_byte(0.15)
    b.stream_rate = 8 * MB  # far: 1.2 MB on the wire per stream
    slots = [b.acquire(lambda: False) for _ in range(2)]
    assert all(s is not None for s in slots)
    b.add(1, queued=64 * 1024)  # paced by the link: less than a read waits after a read
    # what waits, a round trip of the stream's bytes on the wire, and as much in the server's send buffer
    assert b.split_cost() == 64 * 1024 + 2 * int(8 * MB * 0.15)
    b.add(1, queued=int(8 * MB * 0.15) + 1)  # more than a round trip's bytes (and than a read) wait: not the link
    assert b.split_cost() is None
    clock.now += SETTLE_RTTS * 0.15
    b.add(1)  # a window opens
    clock.now += WINDOW_RTTS * 0.15 + 0.01
    b.add(8 * MB)  # ... and ends: what waited during it still counts
    assert b.split_cost() is None and b.backlog == int(8 * MB * 0.15) + 1
    b.add(1)
    clock.now += WINDOW_RTTS * 0.15 + 0.01
    b.add(8 * MB)  # a whole window in which the reads kept up: the link sets the pace again
    assert b.backlog == 0 and b.split_cost() == 2 * int(b.stream_rate * 0.15)
    b.rtt, b.stream_rate = 1e-4, 200 * MB  # localhost: 20 KB on the wire; a read takes up to 1 MiB
    b.add(1, queued=1024 * 1024 + 1)
    assert b.split_cost() is None


def test_small_files_do_not_wait_for_the_weights_streams(hub: HubServer, dino_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # One stream, held by the weights from piece to piece: the preprocessor config, README and LICENSE (a few
    # hundred bytes each) are short requests beside it, asked while the weights still stream, not after them.
    files = vit_repo_files(hidden=256, intermediate=1024, layers=8)  # ~25 MB of weights
    hub.add_repo(TINY, files)
    hub.faults.add(host="cdn", path_suffix="model.safetensors", throttle_bps=16 * 1024 * 1024)
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "1")
    fetch(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == files["model.safetensors"]
    weights_done = max(r.done or 0.0 for r in hub.ended_bodies("model.safetensors"))
    for name in ("preprocessor_config.json", "README.md", "LICENSE.md"):
        (asked,) = [r for r in hub.requests if r.path.endswith("/" + name)]
        assert asked.t < weights_done, name


def _max_concurrent_bodies(hub: HubServer) -> int:
    """The most weight-file answers the server was sending at once (from each GET's arrival and its last byte)."""
    events = []
    for r in hub.ended_bodies(".safetensors"):  # each one's end noted (done)
        if r.body_bytes:
            events += [(r.t, 1), (r.done, -1)]
    most = now = 0
    for _, step in sorted(events):
        now += step
        most = max(most, now)
    return most


def test_one_budget_for_the_whole_fetch_head_start_included(hub: HubServer, dino_root: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 shards: the head start takes two, the main path two more; each file alone would open up to 3 streams
    files = shard_files(vit_repo_files(hidden=256, intermediate=1024, layers=8), 4)
    hub.add_repo(TINY, files)
    hub.faults.add(host="cdn", throttle_bps=8 * 1024 * 1024)  # slow enough for the streams to overlap
    hub.faults.add(host="hub", throttle_bps=8 * 1024 * 1024)
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "3")
    real = Settings.from_env
    monkeypatch.setattr(Settings, "from_env", classmethod(lambda cls: replace(real(), min_split=1024 * 1024)))
    fetch(dino_root, TINY)
    for name in (n for n in files if n.endswith(".safetensors")):
        assert (dino_root / name).read_bytes() == files[name]
    assert len(hub.file_gets(".safetensors")) > 4  # several ranged GETs per file
    assert 2 <= _max_concurrent_bodies(hub) <= 3


def test_round_trips_count_new_connections_and_redirects(hub: HubServer, tiny: dict[str, bytes]) -> None:
    # The round trip comes from times to first byte divided by what each answer cost: a new plain connection
    # is 2 (handshake + request), a kept-alive one 1, and a redirect's hops add up (Hub, then the CDN).
    from dinov3_fetcher._http import HttpPool

    pool = HttpPool(10.0, "test")
    try:
        url = f"{hub.endpoint}/{TINY}/resolve/main/config.json"
        answer = pool.get(url, {})
        answer.read()
        pool.finish(answer)
        assert answer.round_trips == 2  # a new connection
        answer = pool.get(url, {})
        answer.read()
        pool.finish(answer)
        assert answer.round_trips == 1  # the same connection again
        weights = f"{hub.endpoint}/{TINY}/resolve/main/model.safetensors"
        answer = pool.get(weights, {"Range": "bytes=0-0"})
        answer.read()
        pool.finish(answer)
        assert answer.url != weights  # redirected to the CDN
        assert answer.round_trips == 1 + 2  # the Hub's 302 on the kept connection, then a new one to the CDN
        head = pool.head(weights)
        assert head.resp.status == 302 and head.round_trips == 1
    finally:
        pool.close()


def test_a_request_waits_for_a_warmed_connection_only_while_none_other_waits_for_it() -> None:
    # A connection warm() opens (its TLS handshake held here: the server never answers it) is waited for by one
    # request; the next one opens its own rather than wait for a connection another request will take.
    import socket
    import threading

    from dinov3_fetcher._http import HttpPool

    server = socket.create_server(("127.0.0.1", 0))
    origin = f"https://127.0.0.1:{server.getsockname()[1]}"
    pool = HttpPool(60.0, "test")
    try:
        pool.warm(origin, 1)
        first: list[object] = []
        waiter = threading.Thread(target=lambda: first.append(pool.acquire(origin + "/a")), daemon=True)
        waiter.start()
        while not pool._waiting.get(("https", origin.removeprefix("https://"))):
            waiter.join(0.005)
        second = pool.acquire(origin + "/b")  # returns at once, with a connection of its own (not open yet)
        assert second.sock is None and waiter.is_alive() and first == []
    finally:
        server.close()  # the warmed connection's handshake fails: the waiting request opens its own
        pool.close()
        waiter.join(60)
    assert len(first) == 1


def test_warmed_connections_carry_the_first_requests(hub: HubServer, tiny: dict[str, bytes]) -> None:
    # HttpPool.warm opens connections ahead (the head start's first requests find them open, their handshakes
    # overlapped with the Hub client's import); a request meanwhile waits for one rather than open another.
    from dinov3_fetcher._http import HttpPool

    pool = HttpPool(10.0, "test")
    try:
        pool.warm(hub.endpoint, 2)
        url = f"{hub.endpoint}/{TINY}/resolve/main/config.json"
        answers = []
        for _ in range(2):  # one after the other: each takes a warmed connection, none is opened anew
            answer = pool.get(url, {})
            assert answer.conn is not None and answer.conn.sock is not None
            answers.append((answer.read(), answer.round_trips, answer.conn.sock.getsockname()[1]))
        assert [a[0] for a in answers] == [tiny["config.json"]] * 2
        assert [a[1] for a in answers] == [1, 1]  # already open when asked
        peers = {r.peer for r in hub.requests}
        assert len(peers) == 2 and peers == {a[2] for a in answers}  # the two warmed ones, one request each
    finally:
        pool.close()
