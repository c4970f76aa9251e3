"""Online updates: the HCTR message codec, the Redis Streams producer and the ingestor."""

from .codec import MalformedMessage, decode, encode
from .stream import DEFAULT_STREAM, Publisher, connect, dead_letter_stream

__all__ = [
    "DEFAULT_STREAM",
    "MalformedMessage",
    "Publisher",
    "connect",
    "dead_letter_stream",
    "decode",
    "encode",
]
