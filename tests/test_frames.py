"""Data-plane framing and sealing: tampering and truncation always detected."""

from __future__ import annotations

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pexec.errors import ProtocolError
from p2pexec.protocol.frames import (
    FrameDecoder, Op, Reassembler, chunk_pieces, decode_ops, encode_frame, encode_op,
    ALIGN, failed_data, pack_parts, read_failed, unpack_parts,
)
from p2pexec.protocol.sealing import Opener, Sealer, channel_header, session_keys
from p2pexec.protocol.matching import credit_window, should_request, slots_to_accept, slots_to_offer, slots_wanted
from p2pexec.protocol.lease import CreditLedger


def keys():
    cpk, csk = sodium.crypto_kx_keypair()
    wpk, wsk = sodium.crypto_kx_keypair()
    c_rx, c_tx = session_keys("client", cpk, csk, wpk)
    w_rx, w_tx = session_keys("worker", wpk, wsk, cpk)
    return (c_rx, c_tx), (w_rx, w_tx)


@given(st.lists(st.binary(max_size=300), max_size=20), st.data())
def test_frames_reassemble_from_any_chunking(payloads, data):
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder, out, prev = FrameDecoder(), [], 0
    for cut in cuts + [len(stream)]:
        out.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert out == payloads and decoder.pending == 0


def test_oversize_frame_announcement_refused_before_buffering():
    with pytest.raises(ProtocolError):
        list(FrameDecoder(max_frame=100).feed(encode_frame(b"x" * 101)[:8]))


def channel(tx, rx, aes=(True, True)):
    """A sealer and the opener of its peer; ``aes``: does each end do AES in hardware?"""
    mine, theirs = channel_header(aes[0]), channel_header(aes[1])
    return Sealer(tx, mine, theirs), Opener(rx, mine, theirs)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8), st.data())
def test_any_tampering_reordering_or_truncation_is_detected(messages, data):
    (c_rx, c_tx), (w_rx, w_tx) = keys()
    assert c_tx == w_rx and c_rx == w_tx and c_rx != c_tx
    sealer, opener = channel(c_tx, w_rx, data.draw(st.tuples(st.booleans(), st.booleans())))
    frames = [sealer.seal(m) for m in messages] + [sealer.seal(b"bye", final=True)]
    attack = data.draw(st.sampled_from(["flip", "swap", "drop", "truncate-final"]))
    frames = list(frames)
    if attack == "flip":
        i = data.draw(st.integers(0, len(frames) - 1))
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i] = frames[i][:j] + bytes([frames[i][j] ^ 1]) + frames[i][j + 1:]
    elif attack == "swap" and len(frames) > 1:
        i = data.draw(st.integers(0, len(frames) - 2))
        if frames[i] == frames[i + 1]:
            return
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
    elif attack == "drop":
        del frames[data.draw(st.integers(0, len(frames) - 2))]
    else:
        frames.pop()
    received = []
    with pytest.raises(ProtocolError):
        for frame in frames:
            received.append(opener.open(frame))
        if not opener.finished:
            raise ProtocolError("truncated")
    assert received == messages[: len(received)]


@given(st.lists(st.tuples(st.sampled_from(list(Op)), st.integers(0, 2**64 - 1), st.binary(max_size=50)),
                max_size=10))
def test_several_ops_per_message_roundtrip(ops):
    message = b"".join(encode_op(*op) for op in ops)
    decoded = list(decode_ops(message))
    assert [(op, arg, data) for op, arg, data, _ in decoded] == ops
    assert all(message[offset : offset + len(data)] == data for _, _, data, offset in decoded)


@given(st.binary(max_size=60))
def test_malformed_ops_raise_protocol_error_only(data):
    try:
        list(decode_ops(data))
    except ProtocolError:
        pass


def test_unknown_and_truncated_ops_are_errors():
    with pytest.raises(ProtocolError, match="unknown"):
        list(decode_ops(b"\x63" + bytes(16)))
    with pytest.raises(ProtocolError, match="short"):
        list(decode_ops(b"\x01"))
    with pytest.raises(ProtocolError, match="longer"):
        list(decode_ops(encode_op(Op.TASK, 1, b"abc")[:-1]))


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.integers(0, 10**4), st.integers(1, 10**4))
def test_slots_wanted_never_exceeds_max_workers_or_the_work(pending, inflight, leased, max_workers):
    wanted = slots_wanted(pending, inflight, leased, max_workers)
    assert wanted >= 0
    if wanted:
        assert leased + wanted <= max_workers
        assert leased + wanted <= pending + inflight


@given(st.integers(-5, 100), st.integers(-5, 100))
def test_offer_and_accept_bounded(a, b):
    assert 0 <= slots_to_offer(a, b) <= max(0, min(a, b))
    assert 0 <= slots_to_accept(a, b) <= max(0, min(a, b))


class ChannelMachine(RuleBasedStateMachine):
    """A sealed stream opened frame by frame stays in sync, whatever is sent."""

    @initialize(aes=st.tuples(st.booleans(), st.booleans()))
    def open_channel(self, aes):
        (_, tx), (rx, _) = keys()
        self.sealer, self.opener = channel(tx, rx, aes)
        self.decoder = FrameDecoder()
        self.sent: list[bytes] = []
        self.got: list[bytes] = []

    @precondition(lambda self: not self.sealer.closed)
    @rule(msg=st.binary(max_size=200), final=st.booleans())
    def send(self, msg, final):
        wire = encode_frame(self.sealer.seal(msg, final))
        self.sent.append(msg)
        for frame in self.decoder.feed(wire):
            self.got.append(self.opener.open(frame))

    @precondition(lambda self: self.sealer.closed)
    @rule(msg=st.binary(max_size=20))
    def nothing_after_final(self, msg):
        with pytest.raises(ProtocolError):
            self.sealer.seal(msg)
        with pytest.raises(ProtocolError):
            self.opener.open(b"\0" * 40)

    @invariant()
    def in_sync(self):
        assert self.got == self.sent
        assert self.opener.finished == self.sealer.closed


TestChannelMachine = ChannelMachine.TestCase


@pytest.mark.parametrize("aes", [True, False])
def test_a_chunk_reflected_to_its_sender_does_not_open(aes):
    """Each direction has its own key (and nonce prefix): a relay that sends a client's chunk back to it, as
    if the worker had sealed it, is caught."""
    (c_rx, c_tx), (w_rx, w_tx) = keys()
    client_header, worker_header = channel_header(aes), channel_header(aes)
    chunk = Sealer(c_tx, client_header, worker_header).seal(b"task")
    for key, header in ((c_rx, client_header), (c_rx, worker_header), (c_tx, worker_header)):
        with pytest.raises(ProtocolError, match="authentication"):
            Opener(key, header, client_header).open(chunk)
    assert Opener(w_rx, client_header, worker_header).open(chunk) == b"task"


@given(st.integers(1, 100_000))
def test_a_burst_of_submits_costs_logarithmically_many_requests(burst):
    asked, posts = 0, 0
    for wanted in range(1, burst + 1):  # each submit raises demand by one, within one REQUEST_EVERY
        if should_request(wanted, asked, since_last=0.0, every=2.0):
            asked, posts = wanted, posts + 1
    assert asked * 2 > burst and posts <= burst.bit_length()


@given(st.integers(0, 1000), st.integers(0, 1000), st.floats(0, 10))
def test_requests_repeat_while_wanted_and_never_when_not(wanted, asked, since):
    if wanted == 0:
        assert not should_request(wanted, asked, since, 2.0)
    elif since >= 2.0:
        assert should_request(wanted, asked, since, 2.0)


@given(st.integers(1, 64), st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)))
def test_credit_window_bounds(slots, mean):
    window = credit_window(slots, mean)
    assert slots <= window <= slots * 17
    if mean is None or mean >= 0.1:
        assert window == slots  # nothing queued behind unknown or long tasks


class LedgerMachine(RuleBasedStateMachine):
    """A client that respects its credit is never refused; one that does not, always is.

    Every task received is answered exactly once: finished, or cancelled
    when withdrawn before it started.
    """

    def __init__(self):
        super().__init__()
        self.ledger = CreditLedger(slots=2)
        self.credit = 0
        self.next_id = 1
        self.queued: list[int] = []
        self.running: list[int] = []
        self.withdrawn: list[int] = []  # still in the worker's queue, to be skipped
        self.answers = 0

    @rule()
    def worker_grants(self):
        self.credit += self.ledger.grant()

    @rule()
    def client_sends(self):
        if self.credit > 0:
            self.ledger.task_received(self.next_id)
            self.credit -= 1
            self.queued.append(self.next_id)
        else:
            with pytest.raises(ProtocolError):
                self.ledger.task_received(self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.credit > 0 and (self.queued or self.running))
    @rule(data=st.data())
    def client_reuses_an_outstanding_id(self, data):
        with pytest.raises(ProtocolError, match="reused"):
            self.ledger.task_received(data.draw(st.sampled_from(self.queued + self.running)))

    @precondition(lambda self: self.queued or self.withdrawn)
    @rule(data=st.data())
    def slot_takes_next(self, data):
        task_id = data.draw(st.sampled_from(self.queued + self.withdrawn))
        started = self.ledger.task_started(task_id)
        assert started == (task_id in self.queued)
        (self.queued if started else self.withdrawn).remove(task_id)
        if started:
            self.running.append(task_id)

    @rule(data=st.data())
    def client_withdraws(self, data):
        task_id = data.draw(st.integers(0, self.next_id))
        dropped = self.ledger.withdraw(task_id)
        assert dropped == (task_id in self.queued)
        if dropped:
            self.queued.remove(task_id)
            self.withdrawn.append(task_id)
            self.answers += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data(), seconds=st.none() | st.floats(0, 1))
    def task_answered(self, data, seconds):
        task_id = data.draw(st.sampled_from(self.running))
        self.ledger.task_answered(task_id, seconds)
        self.running.remove(task_id)
        self.answers += 1

    @invariant()
    def window_respected(self):
        assert self.ledger.outstanding <= credit_window(2, 0.0)
        assert self.ledger.outstanding == self.credit + len(self.queued) + len(self.running)
        assert self.ledger.answered == self.answers
        assert self.ledger.received == self.answers + len(self.queued) + len(self.running)


TestLedgerMachine = LedgerMachine.TestCase


def chunk_message(parts, size):
    """Each chunk's plaintext, as the channel seals it."""
    return (b"".join(pieces) for pieces in chunk_pieces(parts, size))


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 128))
def test_chunked_messages_reassemble_whatever_the_split(parts, size):
    chunks = list(chunk_message(parts, size=size))
    assert all(len(c) <= size + 9 for c in chunks)
    reassembler = Reassembler()
    outputs = [reassembler.feed(c) for c in chunks]
    assert all(o is None for o in outputs[:-1])
    assert bytes(outputs[-1]) == b"".join(parts)


@given(st.lists(st.binary(min_size=1, max_size=100), min_size=2, max_size=5), st.data())
def test_dropped_or_repeated_chunks_are_errors(parts, data):
    chunks = list(chunk_message(parts, size=16))
    if len(chunks) < 3:
        return
    i = data.draw(st.integers(1, len(chunks) - 2))
    broken = chunks[:i] + chunks[i + 1:] if data.draw(st.booleans()) else chunks[:i] + [chunks[0]] + chunks[i:]
    reassembler = Reassembler()
    with pytest.raises(ProtocolError):
        for c in broken:
            reassembler.feed(c)


def test_announced_size_over_the_limit_is_refused_before_allocating():
    first = next(chunk_message([bytes(100)], size=10))
    with pytest.raises(ProtocolError, match="limit"):
        Reassembler(max_message=50).feed(first)


@given(st.lists(st.binary(max_size=50), max_size=5))
def test_payload_parts_roundtrip(parts):
    packed = b"".join(pack_parts(parts))
    assert [bytes(p) for p in unpack_parts(packed)] == parts


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=6), st.integers(0, 4096))
def test_payload_parts_laid_out_to_land_start_aligned_there(parts, landing):
    packed = bytearray(b"".join(bytes(p) for p in pack_parts(parts, landing)))
    back = unpack_parts(packed)
    assert [bytes(p) for p in back] == parts
    origin = _address(memoryview(packed))  # where the payload lands, ``landing`` past an aligned address
    for part in back[1:]:
        if part.nbytes:  # (an empty part has no address)
            assert (landing + _address(part) - origin) % ALIGN == 0


def _address(view):
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_padding_of_a_whole_alignment_or_more_is_refused():
    packed = bytearray(b"".join(bytes(p) for p in pack_parts([b"main", b"x" * 10], landing=1)))
    packed[12] = ALIGN  # the second part's entry: its padding byte
    with pytest.raises(ProtocolError, match="padding"):
        unpack_parts(packed)


@given(st.binary(max_size=80))
def test_malformed_payloads_raise_protocol_error_only(data):
    try:
        unpack_parts(data)
    except ProtocolError:
        pass


@given(st.text(), st.text(), st.text())
def test_a_failed_tasks_reason_and_output_come_apart_as_they_went(reason, stdout, stderr):
    got = read_failed(failed_data(reason, stdout, stderr))
    clean = reason.replace("\0", " ")
    assert got == tuple(t.encode(errors="backslashreplace").decode(errors="replace") for t in (clean, stdout, stderr))


@given(st.binary())
def test_whatever_a_worker_sends_as_a_failure_reads_as_three_texts(data):
    assert all(isinstance(t, str) for t in read_failed(data))
