"""Chunks sealed in place and opened into their message's buffer: the same bytes on the wire as the
binding's own calls, and every chunk still authenticated, in order, with the final flag checked, under
either cipher a channel may agree on."""

from __future__ import annotations

import mmap
import os

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec.errors import ProtocolError
from p2pexec.protocol.frames import CHUNK, LENGTH, FrameDecoder, Reassembler, Recycled, chunk_pieces
from p2pexec.protocol.sealing import AEGIS256, XCHACHA20, Opener, Sealer, channel_header, open_chunk
from p2pexec.worker import hop

KEY = bytes(range(32))
CIPHERS = pytest.mark.parametrize("aes", [True, False], ids=["AEGIS-256", "XChaCha20-Poly1305"])


def headers(aes=True):
    """The sender's and the receiver's channel headers: both do AES in hardware, or neither."""
    return channel_header(aes), channel_header(aes)


def seal_all(parts, size=CHUNK, final=True, aes=True):
    """The wire bytes of one message made of ``parts``, then (with ``final``) a final frame."""
    both = headers(aes)
    sealer = Sealer(KEY, *both)
    frames = [bytes(sealer.seal_frame(chunk)) for chunk in chunk_pieces(parts, size)]
    if final:
        frames.append(bytes(sealer.seal_frame([b"\x00bye"], final=True)))
    return both, frames


class ThroughFile(bytearray):
    """A WrittenThrough buffer (as a worker's shared memory is): writing to it any other way fails the test."""

    def write_at(self, offset, data):
        data = bytes(data)
        assert offset + len(data) <= len(self), "written past its end"  # (a sealed memfd refuses to grow)
        bytearray.__setitem__(self, slice(offset, offset + len(data)), data)

    def __setitem__(self, key, value):
        raise AssertionError("written through its mapping, not write_at")


def receive(both, frames, allocate=bytearray):
    """What a SecureChannel would hand on: complete messages, and whether the final frame came."""
    opener, reassembler, decoder = Opener(KEY, *both), Reassembler(allocate=allocate), FrameDecoder()
    messages = []
    for frame in decoder.feed(b"".join(frames)):
        message = open_chunk(opener, reassembler, frame)
        if message is not None and not opener.finished:
            messages.append(bytes(message))
    return messages, opener.finished


@given(st.lists(st.binary(max_size=40), max_size=4), st.booleans(), st.booleans(), st.integers(0, 3))
def test_sealing_in_place_gives_the_bindings_ciphertext(parts, final, aes, earlier):
    both = headers(aes)
    sealer = Sealer(KEY, *both)
    for _ in range(earlier):  # the nonce counts the chunks sealed before
        sealer.seal_frame([b"earlier"])
    frame = sealer.seal_frame(parts, final)
    cipher, encrypt = ((AEGIS256, sodium.crypto_aead_aegis256_encrypt) if aes
                       else (XCHACHA20, sodium.crypto_aead_xchacha20poly1305_ietf_encrypt))
    assert sealer.cipher is cipher
    nonce = both[0][1 : 1 + cipher.nonce_bytes - 8] + earlier.to_bytes(8, "big")
    flag = bytes([final])
    expected = flag + encrypt(b"".join(parts), flag, nonce, KEY)
    assert bytes(frame) == LENGTH.pack(len(expected)) + expected


@pytest.mark.parametrize("sender, receiver, cipher", [
    (True, True, AEGIS256), (True, False, XCHACHA20), (False, True, XCHACHA20), (False, False, XCHACHA20)])
def test_aegis_only_where_both_ends_do_aes_in_hardware(sender, receiver, cipher):
    mine, theirs = channel_header(sender), channel_header(receiver)
    assert Sealer(KEY, mine, theirs).cipher is Opener(KEY, mine, theirs).cipher is cipher
    assert Sealer(KEY, theirs, mine).cipher is cipher  # (the other direction)


@pytest.mark.parametrize("header", [b"", bytes(24), bytes(26), b"\x02" + bytes(24), b"\xff" + bytes(24)])
def test_a_bad_channel_header_is_refused(header):
    with pytest.raises(ProtocolError, match="channel header"):
        Opener(KEY, header, channel_header(True))
    with pytest.raises(ProtocolError, match="channel header"):
        Sealer(KEY, channel_header(True), header)


@CIPHERS
def test_each_channel_has_its_own_nonces(aes):
    """Two channels under one key (a client session's and a worker offer's, leased twice) never share a
    nonce: the same plaintext seals differently, and one channel's chunk does not open on the other."""
    one, other = headers(aes), headers(aes)
    first = Sealer(KEY, *one).seal(b"same")
    assert first != Sealer(KEY, *other).seal(b"same")
    with pytest.raises(ProtocolError, match="authentication"):
        Opener(KEY, *other).open(first)


@given(st.lists(st.binary(max_size=300), max_size=5), st.integers(1, 64),
       st.sampled_from([bytearray, None, ThroughFile]), st.booleans())
def test_messages_survive_any_chunk_size(parts, size, allocate, aes):
    header, frames = seal_all(parts, size, aes=aes)
    assert receive(header, frames, allocate) == ([b"".join(parts)], True)


@pytest.mark.parametrize("total", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 9, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK + 7])
@pytest.mark.parametrize("allocate", [bytearray, None, ThroughFile, hop.allocate])
@CIPHERS
def test_sizes_at_chunk_boundaries(total, allocate, aes):
    data = bytes(range(251)) * (total // 251) + bytes(total % 251)
    parts = [data[:CHUNK // 3], memoryview(data)[CHUNK // 3 :]]  # a part boundary inside a chunk too
    header, frames = seal_all(parts, aes=aes)
    assert receive(header, frames, allocate) == ([data], True)


@CIPHERS
def test_the_buffer_given_is_the_one_filled(aes):
    made = []

    def allocate(size: int) -> mmap.mmap:
        made.append(mmap.mmap(-1, size))
        return made[-1]

    header, frames = seal_all([bytes(3 * CHUNK)], aes=aes)
    opener, reassembler = Opener(KEY, *header), Reassembler(allocate=allocate)
    outputs = [open_chunk(opener, reassembler, frame[LENGTH.size :]) for frame in frames[:-1]]
    assert outputs[-1] is not None and outputs[-1].obj is made[0]


@settings(max_examples=100)
@given(st.integers(2 * 16 + 1, 6 * 16), st.data())
def test_a_tampered_chunk_is_rejected_and_nothing_of_its_message_comes_out(total, data):
    header, frames = seal_all([bytes(i % 251 for i in range(total))], size=16, aes=data.draw(st.booleans()))
    i = data.draw(st.integers(0, len(frames) - 1))
    j = data.draw(st.integers(LENGTH.size, len(frames[i]) - 1))
    frames[i] = frames[i][:j] + bytes([frames[i][j] ^ 1]) + frames[i][j + 1 :]
    with pytest.raises(ProtocolError, match="authentication"):
        receive(header, frames)


@given(st.integers(17, 200), st.data())
def test_a_dropped_repeated_or_swapped_chunk_is_rejected(total, data):
    header, frames = seal_all([bytes(total)], size=16, aes=data.draw(st.booleans()))
    i = data.draw(st.integers(0, len(frames) - 2))
    attack = data.draw(st.sampled_from(["drop", "repeat", "swap"]))
    if attack == "drop":
        del frames[i]
    elif attack == "repeat":
        frames.insert(i, frames[i])
    else:
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
    with pytest.raises(ProtocolError):
        receive(header, frames)


@given(st.integers(0, 200), st.data())
def test_a_truncated_stream_yields_no_final_and_no_partial_message(total, data):
    header, frames = seal_all([bytes(total)], size=16, aes=data.draw(st.booleans()))
    kept = data.draw(st.integers(0, len(frames) - 1))
    messages, finished = receive(header, frames[:kept])
    assert not finished
    assert messages == ([bytes(total)] if kept == len(frames) - 1 else [])


def sealed_chunks(plaintexts, aes):
    """Chunks with arbitrary (authentic) contents, as a peer that breaks the chunking rules would seal them."""
    both = headers(aes)
    sealer = Sealer(KEY, *both)
    return both, [sealer.seal(p) for p in plaintexts]


@pytest.mark.parametrize("kind", [0, 1, 4, 255])
@CIPHERS
def test_an_authentic_chunk_of_the_wrong_kind_mid_message_is_rejected(kind, aes):
    first = b"\x01" + (40).to_bytes(8, "big") + bytes(16)
    header, frames = sealed_chunks([first, bytes([kind]) + bytes(16)], aes)
    opener, reassembler = Opener(KEY, *header), Reassembler()
    assert open_chunk(opener, reassembler, frames[0]) is None
    with pytest.raises(ProtocolError, match="unexpected chunk kind"):
        open_chunk(opener, reassembler, frames[1])


@CIPHERS
def test_chunks_longer_or_shorter_than_announced_are_rejected(aes):
    first = b"\x01" + (40).to_bytes(8, "big") + bytes(16)
    header, frames = sealed_chunks([first, b"\x02" + bytes(25)], aes)
    opener, reassembler = Opener(KEY, *header), Reassembler()
    open_chunk(opener, reassembler, frames[0])
    with pytest.raises(ProtocolError, match="longer than announced"):
        open_chunk(opener, reassembler, frames[1])
    header, frames = sealed_chunks([first, b"\x03" + bytes(8)], aes)
    opener, reassembler = Opener(KEY, *header), Reassembler()
    open_chunk(opener, reassembler, frames[0])
    with pytest.raises(ProtocolError, match="shorter than announced"):
        open_chunk(opener, reassembler, frames[1])


@CIPHERS
@pytest.mark.parametrize("flip", [0, 1, -1])  # the final flag, the ciphertext, the MAC
def test_a_forged_chunk_leaves_nothing_of_its_plaintext(aes, flip):
    both = headers(aes)
    frame = bytearray(Sealer(KEY, *both).seal(b"secret"))
    frame[flip] ^= 1
    out = bytearray(b"abcdef")
    with pytest.raises(ProtocolError, match="authentication"):
        Opener(KEY, *both).open_into(frame, out)
    assert out in (b"abcdef", bytes(6))  # (libsodium wipes a failed decryption's output)


@CIPHERS
@pytest.mark.parametrize("forgery", ["ciphertext", "flag 2", "flag 255"])
def test_after_a_forged_chunk_nothing_opens_not_even_the_genuine_one(aes, forgery):
    """A tampered chunk must not pass for a dropped one: the opener refuses everything after it."""
    both = headers(aes)
    sealer = Sealer(KEY, *both)
    genuine = [sealer.seal(b"one"), sealer.seal(b"two", final=True)]
    forged = bytearray(genuine[0])
    if forgery == "ciphertext":
        forged[1] ^= 1
    else:
        forged[0] = int(forgery.split()[1])
    opener = Opener(KEY, *both)
    with pytest.raises(ProtocolError, match="authentication"):
        opener.open(bytes(forged))
    for frame in genuine:
        with pytest.raises(ProtocolError, match="failed authentication"):
            opener.open(frame)
    assert not opener.finished


@CIPHERS
def test_a_chunk_that_fails_in_its_place_leaves_the_message_so_far_as_it_was(aes):
    """Decrypting in place covers the last byte of the chunk before (its kind header lands there); libsodium
    wipes a failed output, and that byte is put back."""
    total = 3 * 16
    header, frames = seal_all([bytes(range(1, total + 1))], size=16, aes=aes)
    opener, reassembler = Opener(KEY, *header), Reassembler()
    assert open_chunk(opener, reassembler, frames[0][LENGTH.size :]) is None
    so_far = bytes(reassembler._buf[: reassembler._filled])
    forged = bytearray(frames[1][LENGTH.size :])
    forged[-1] ^= 1
    with pytest.raises(ProtocolError, match="authentication"):
        open_chunk(opener, reassembler, bytes(forged))
    assert bytes(reassembler._buf[: reassembler._filled]) == so_far and so_far[-1] != 0


@CIPHERS
@pytest.mark.parametrize("bad", ["tampered", "wrong kind"])
def test_a_chunk_that_fails_leaves_a_written_through_message_as_it_was(aes, bad):
    """Such a chunk opens into the reassembler's own buffer first: nothing of it reaches the message."""
    first = b"\x01" + (40).to_bytes(8, "big") + bytes(range(1, 17))
    header, frames = sealed_chunks([first, (b"\x02" if bad == "tampered" else b"\x01") + bytes(range(100, 116))], aes)
    opener, reassembler = Opener(KEY, *header), Reassembler(allocate=ThroughFile)
    assert open_chunk(opener, reassembler, frames[0]) is None
    if bad == "tampered":
        frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 1])
    with pytest.raises(ProtocolError, match="authentication" if bad == "tampered" else "unexpected chunk kind"):
        open_chunk(opener, reassembler, frames[1])
    assert bytes(reassembler._buf) == bytes(range(1, 17)) + bytes(24)


@pytest.mark.skipif(not hop.shared(), reason="no memfd here")
def test_a_message_in_shared_memory_is_written_through_its_file_and_sealed_against_writes_once_whole():
    data = bytes(range(251)) * (3 * CHUNK // 251)
    header, frames = seal_all([data])
    opener, reassembler = Opener(KEY, *header), Reassembler(allocate=hop.allocate)
    message = next(m for m in (open_chunk(opener, reassembler, f[LENGTH.size :]) for f in frames) if m is not None)
    fd = hop.sealed_fd(message.obj)
    assert fd is not None and os.pread(fd, len(data), 0) == data and message == data
    assert message.readonly  # (so nothing could have been written through the mapping)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"changed", 0)
    with pytest.raises(PermissionError):
        mmap.mmap(fd, len(data))  # (shared and writable)
    assert mmap.mmap(fd, len(data), flags=mmap.MAP_PRIVATE)[:3] == data[:3]  # as a task process maps it


@pytest.mark.skipif(not hop.shared(), reason="no memfd here")
def test_shared_memory_that_cannot_be_sealed_is_not_handed_out(caplog):
    hop._unsealable.cache_clear()  # (said once per process)
    memory = hop.allocate(2 * hop.SHARED_MIN)
    writable = mmap.mmap(memory.fd, len(memory))  # (a shared writable mapping: the kernel refuses the seal)
    with caplog.at_level("WARNING", logger="p2pexec.worker"):
        assert hop.sealed_fd(memory) is None and hop.sealed_fd(memory) is None
    assert [r.getMessage() for r in caplog.records if "could not seal" in r.getMessage()] == [
        "could not seal a task's shared memory against writes (Device or resource busy): big messages go to "
        "task processes through their socket instead, a copy each"]  # (once)
    writable.close()


def test_a_message_that_cannot_be_stored_ends_the_channel_with_a_protocol_error():
    class Full(ThroughFile):  # (the first chunk is written by feed, the next ones by placed: fails there)
        def write_at(self, offset, data):
            if offset:
                raise OSError(28, "No space left on device")
            super().write_at(offset, data)

    header, frames = seal_all([bytes(3 * CHUNK)])
    opener, reassembler = Opener(KEY, *header), Reassembler(allocate=Full)
    with pytest.raises(ProtocolError, match="could not store the .* No space left"):
        for frame in frames:
            open_chunk(opener, reassembler, frame[LENGTH.size :])


@CIPHERS
def test_nothing_is_sealed_or_opened_after_the_final_frame(aes):
    both = headers(aes)
    sealer = Sealer(KEY, *both)
    final = sealer.seal_frame([b"bye"], final=True)
    with pytest.raises(ProtocolError, match="closed"):
        sealer.seal_frame([b"more"])
    opener = Opener(KEY, *both)
    opener.open_into(final[LENGTH.size :], bytearray(3))
    assert opener.finished
    with pytest.raises(ProtocolError, match="after the final"):
        opener.open_into(final[LENGTH.size :], bytearray(3))


@CIPHERS
def test_frames_come_out_whole_however_the_reads_split_them(aes):
    header, frames = seal_all([bytes(5 * 1000)], size=1000, aes=aes)
    wire = b"".join(frames)
    decoder = FrameDecoder()
    out = []
    for start in range(0, len(wire), 7):
        out.extend(decoder.feed(wire[start : start + 7]))
        fed = min(start + 7, len(wire))
        assert decoder.pending == fed - sum(LENGTH.size + len(f) for f in out)
    assert out == [f[LENGTH.size :] for f in frames] and decoder.pending == 0


def _message(reassembler, opener, frames):
    """The message the chunks of ``frames`` (with their length prefixes) make."""
    outputs = [open_chunk(opener, reassembler, frame[LENGTH.size :]) for frame in frames]
    assert outputs[-1] is not None and all(out is None for out in outputs[:-1])
    return outputs[-1]


def test_a_big_message_reuses_the_last_ones_memory_only_once_nothing_holds_it(monkeypatch):
    """The client rebuilds big results in memory it wrote before (rewriting it costs a fraction of writing
    new memory), but never in memory a result still uses: an array unpickled in place lies in it.  Nor
    does it mark such memory free: here freed pages are zeroed at once (MADV_DONTNEED), as the system may."""
    monkeypatch.setattr(Recycled, "advice", mmap.MADV_DONTNEED)
    first, second, third = bytes([1]) * (3 * CHUNK), bytes([2]) * (2 * CHUNK + 5), bytes([3]) * (3 * CHUNK)
    both = headers()
    sealer = Sealer(KEY, *both)
    frames = [[bytes(sealer.seal_frame(c)) for c in chunk_pieces([m])] for m in (first, second, third)]
    opener, reassembler = Opener(KEY, *both), Reassembler(allocate=Recycled())

    message = _message(reassembler, opener, frames[0])
    memory = message.obj
    assert bytes(message) == first
    del message  # the reader is done with it
    reassembler.rest()
    message = _message(reassembler, opener, frames[1])
    assert message.obj is memory and bytes(message) == second and len(memory) == len(second)

    kept = message[:8]  # a reader keeps a view: its memory is its own now
    del message
    reassembler.rest()
    assert bytes(kept) == second[:8]
    message = _message(reassembler, opener, frames[2])
    assert message.obj is not memory and bytes(message) == third
    assert bytes(kept) == second[:8]


def test_a_message_being_rebuilt_is_never_marked_free(monkeypatch):
    """(A receive cut short and begun again must not lose what it had.)"""
    monkeypatch.setattr(Recycled, "advice", mmap.MADV_DONTNEED)
    total = 3 * CHUNK
    header, frames = seal_all([bytes([7]) * total])
    opener, reassembler = Opener(KEY, *header), Reassembler(allocate=Recycled())
    assert open_chunk(opener, reassembler, frames[0][LENGTH.size :]) is None
    reassembler.rest()
    outputs = [open_chunk(opener, reassembler, frame[LENGTH.size :]) for frame in frames[1:-1]]
    assert bytes(outputs[-1]) == bytes([7]) * total
