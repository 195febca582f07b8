"""Compressed streams: one byte string per row, with a small header that names the model version that made it.

Layout (7 bytes of header for versions below 128):

    byte 0       0xA1: an aeserve stream, format 1
    bytes 1-3    the first 3 bytes of sha256(model name)
    varint       the version number (LEB128: 7 bits a byte)
    2 bytes      CRC-16/CCITT (big-endian) of every other byte of the stream, header and payload
    the rest     the range coder's 32-bit words, little-endian, without the last word's trailing zero bytes

The name is hashed to keep the header small (every byte counts at ~100 bytes an image); the hash tells a stream
from another model apart from one of this model's other versions. The CRC catches truncation and corruption before
the decoder sees the payload, so a damaged stream is refused rather than decoded into a wrong image.
"""
from __future__ import annotations

import binascii
import hashlib

import numpy as np

MAGIC = 0xA1
# Latents are coded as integers in [-RADIUS, RADIUS]; encoders clamp to it (at the rates trained here no latent comes
# near: their densities put less than 1e-9 of mass beyond |y| = 40).
RADIUS = 63


class StreamError(ValueError):
    """A stream that this version cannot decode; the message says why and, for another version's stream, which."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def name_tag(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:3]


class StreamFormat:
    """Packs and unpacks one version's streams."""

    def __init__(self, name: str, version: int, coder: RangeCoder) -> None:
        self.name, self.version, self.coder = name, version, coder
        self.prefix = bytes([MAGIC]) + name_tag(name) + _varint(version)

    def pack(self, code: np.ndarray) -> bytes:
        """One code (code_dim,) of integers -> its stream."""
        payload = self.coder.encode(code).rstrip(b"\0")
        crc = binascii.crc_hqx(self.prefix + payload, 0)
        return self.prefix + crc.to_bytes(2, "big") + payload

    def unpack(self, stream: bytes, row: int = 0) -> np.ndarray:
        """A stream -> its code (code_dim,) float32. Raises StreamError naming the row and the problem."""
        where = f"row {row}"
        if len(stream) < 1 or stream[0] != MAGIC:
            raise StreamError(f"{where}: not an aeserve stream (it must start with byte 0x{MAGIC:02X}, as compress makes them)")
        if len(stream) < len(self.prefix) + 2:
            raise StreamError(f"{where}: the stream is truncated ({len(stream)} bytes, shorter than its header)")
        tag, version = stream[1:4], self._version(stream, where)
        if tag != name_tag(self.name):
            raise StreamError(f"{where}: the stream was made by another model, not {self.name!r}")
        if version != self.version:
            raise StreamError(f"{where}: the stream was made by version {version} of {self.name!r}, not version {self.version}; "
                              f"decompress it with /v1/models/{self.name}/versions/{version}/decompress")
        header = len(self.prefix)
        crc, payload = int.from_bytes(stream[header:header + 2], "big"), stream[header + 2:]
        if binascii.crc_hqx(self.prefix + payload, 0) != crc:
            raise StreamError(f"{where}: the stream is corrupt or truncated (its checksum does not match its {len(stream)} bytes)")
        try:
            return self.coder.decode(payload + b"\0" * (-len(payload) % 4))
        except (ValueError, RuntimeError, AssertionError) as e:  # a damaged payload that passed the checksum (1 in 65,536)
            raise StreamError(f"{where}: the stream is corrupt ({e})") from None

    @staticmethod
    def _version(stream: bytes, where: str) -> int:
        version, shift = 0, 0
        for byte in stream[4:14]:
            version |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return version
        raise StreamError(f"{where}: the stream's header is damaged (its version number does not end)")


class RangeCoder:
    """Integer latents <-> bytes with constriction's range coder, over a version's stored tables.

    ``channel_of`` gives, for each position of a flattened code, the channel whose table codes it.
    """

    def __init__(self, pmf: np.ndarray, channel_of: np.ndarray) -> None:
        import constriction

        self._constriction = constriction
        self.probabilities = np.ascontiguousarray(pmf[channel_of], dtype=np.float64)  # (code_dim, 2 * RADIUS + 1)
        self.family = constriction.stream.model.Categorical(perfect=False)

    def encode(self, code: np.ndarray) -> bytes:
        """One code (code_dim,) of integers in [-RADIUS, RADIUS] -> its bytes."""
        encoder = self._constriction.stream.queue.RangeEncoder()
        encoder.encode((code.astype(np.int64) + RADIUS).astype(np.int32), self.family, self.probabilities)
        return encoder.get_compressed().tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes -> one code (code_dim,) as float32 integers. Raises ValueError when the bytes cannot be a stream."""
        if len(data) % 4:
            raise ValueError(f"a stream's payload is whole 32-bit words; this one has {len(data)} bytes")
        decoder = self._constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype=np.uint32).copy())
        symbols = decoder.decode(self.family, self.probabilities)
        return (symbols.astype(np.float32) - RADIUS)
