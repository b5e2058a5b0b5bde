"""TFRecord framing and tf.train.Example coding on plain file objects.

A TFRecord file is a sequence of frames:

    uint64 length (little-endian) | uint32 masked CRC32C of the length | data[length] | uint32 masked CRC32C of data

Reading the frames ourselves (instead of through `tf.data`) lets any file object do: one opened through Beam's
`FileSystems` (so `gs://` works on Dataflow workers without TensorFlow's own GCS plug-in), a gzip stream, a buffer.
Each frame's CRCs are checked, so a truncated or corrupted file is reported with its byte offset instead of being
read as garbage. The records themselves are decoded with TensorFlow's own `tf.train.Example` message class.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

import google_crc32c

_LENGTH_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """CRC32C of `data`, rotated and offset as TFRecord stores it (so that CRCs of CRCs stay well-mixed)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class FrameError:
    """A frame that could not be read.

    `fatal` frames end the file: after a truncation or a corrupt length header the frame boundaries are lost.
    A frame whose data CRC does not match is not fatal: the next frame starts right after it.
    """

    index: int  # position of the frame in the file, counting from 0
    offset: int  # byte offset of the frame's length header
    kind: str  # "truncated" or "corrupt"
    message: str
    fatal: bool


def _read_exactly(fileobj: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the file (file objects may return short reads)."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = fileobj.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def iter_frames(fileobj: BinaryIO, *, verify_crc: bool = True) -> Iterator[bytes | FrameError]:
    """Yield the data of each frame in order, or a `FrameError` where a frame is broken (see its `fatal`)."""
    index, offset = 0, 0
    while True:
        header = _read_exactly(fileobj, _LENGTH_HEADER.size)
        if not header:
            return
        if len(header) < _LENGTH_HEADER.size:
            yield FrameError(index, offset, "truncated", f"file ends inside the header of record {index}", True)
            return
        length, length_crc = _LENGTH_HEADER.unpack(header)
        if verify_crc and masked_crc32c(header[:8]) != length_crc:
            yield FrameError(index, offset, "corrupt", f"length CRC mismatch in the header of record {index}", True)
            return
        body = _read_exactly(fileobj, length + _CRC.size)
        if len(body) < length + _CRC.size:
            yield FrameError(
                index,
                offset,
                "truncated",
                f"file ends inside record {index} ({len(body)} of {length + _CRC.size} bytes present)",
                True,
            )
            return
        data = body[:length]
        if verify_crc and masked_crc32c(data) != _CRC.unpack(body[length:])[0]:
            yield FrameError(index, offset, "corrupt", f"data CRC mismatch in record {index}", False)
        else:
            yield data
        index += 1
        offset += _LENGTH_HEADER.size + length + _CRC.size


def write_frame(fileobj: BinaryIO, data: bytes) -> None:
    """Append one record to a TFRecord stream."""
    length = struct.pack("<Q", len(data))
    fileobj.write(length + _CRC.pack(masked_crc32c(length)) + data + _CRC.pack(masked_crc32c(data)))


@functools.cache
def _example_class() -> Any:
    """tf.train.Example, imported on first use: importing TensorFlow takes seconds, and WebDataset and Parquet
    readers never need it."""
    from tensorflow.core.example import example_pb2

    return example_pb2.Example


FeatureValue = bytes | str | int | float | bool
"""A feature value: one scalar, or a sequence of scalars of one kind."""


def encode_example(features: Mapping[str, FeatureValue | Sequence[FeatureValue]]) -> bytes:
    """A serialized tf.train.Example: str/bytes go to bytes_list (str as UTF-8), bool/int to int64_list, float to
    float_list. A sequence becomes a list feature of its element kind; an empty sequence an empty bytes_list."""
    example = _example_class()()
    for name, value in features.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        feature = example.features.feature[name]
        if all(isinstance(v, (bytes, str)) for v in values):
            feature.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, (bool, int)) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise TypeError(f"feature {name!r}: cannot store {[type(v).__name__ for v in values]} in one feature")
    return example.SerializeToString()


def decode_example(data: bytes) -> dict[str, list[bytes] | list[int] | list[float]]:
    """Feature name -> list of values (bytes, int or float) of a serialized tf.train.Example.

    Raises google.protobuf.message.DecodeError when `data` is not an Example.
    """
    example = _example_class().FromString(data)
    out: dict[str, list[Any]] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out
