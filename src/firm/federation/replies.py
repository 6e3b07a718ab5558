"""What the server accepts from a client before any arithmetic: tensor payloads whose bytes are
what they declare, numbers of bounded size, and text of bounded length without control codes.

A reply's ``Array`` declares a shape and dtype beside its bytes (a .npy file); the bytes are what
numpy decodes, so a declaration that disagrees with them would pass a check of the declaration and
break the arithmetic later (or be silently cast). Every check here reads the bytes themselves and
never raises: it returns why the payload is refused, or None.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Iterable, Mapping

import numpy as np

# Every number a client reports must be finite and at most this large in magnitude: rewards, KL,
# losses and counts of an honest client are orders of magnitude below it, and a round mean of
# bounded numbers stays finite (1.7e308 would make it inf).
MAX_REPORTED_MAGNITUDE = 1e6
# The longest text the server keeps from a client's error or a rejection reason.
REASON_CHARS = 200
# The longest prompt or response a client may send as a sample (the client cuts its own to this).
SAMPLE_TEXT_CHARS = 4000
# ANSI escape sequences (CSI, e.g. colours and cursor moves; OSC, e.g. window titles and links) and
# every other control character: a reason is shown on terminals and written to logs.
ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]?")
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
NPY_DATA_TYPE = "numpy.ndarray"


def clean_text(text: Any, limit: int = REASON_CHARS) -> str:
    """``text`` without escape sequences and control characters (newlines and tabs become
    spaces), cut to ``limit`` characters with '...' marking the cut."""
    flat = CONTROL_CHARACTER.sub("", ESCAPE_SEQUENCE.sub("", str(text)).replace("\n", " ").replace("\t", " "))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, header length) of a .npy payload; ValueError if it has none."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran), stream.tell()


def payload_problem(name: str, array: Any, shape: tuple[int, ...], dtype: str) -> str | None:
    """Why tensor ``name`` cannot be used as the expected (``shape``, ``dtype``), reading its bytes:
    the declared and the encoded shape and dtype must both be the expected ones, the byte length
    exactly header + data, and the values finite."""
    shape = tuple(int(n) for n in shape)
    declared = (tuple(array.shape), str(array.dtype))
    if declared != (shape, str(dtype)):
        return f"adapter tensor {name} declares shape {declared[0]} and dtype {declared[1]}, expected {shape} {dtype}"
    if array.stype != NPY_DATA_TYPE:
        return f"adapter tensor {name} is serialised as {clean_text(array.stype, 40)!r}, expected {NPY_DATA_TYPE}"
    data = bytes(array.data)
    try:
        encoded_shape, encoded_dtype, fortran, header = npy_header(data)
    except (ValueError, SyntaxError, TypeError) as err:
        return f"adapter tensor {name} is not a .npy payload ({clean_text(err, 80)})"
    if encoded_shape != shape or encoded_dtype != np.dtype(dtype) or fortran:
        return (f"adapter tensor {name} declares shape {shape} and dtype {dtype} but its payload holds "
                f"{encoded_shape} {encoded_dtype}{' (Fortran order)' if fortran else ''}")
    expected_bytes = header + math.prod(shape) * encoded_dtype.itemsize
    if len(data) != expected_bytes:
        return f"adapter tensor {name} has {len(data)} bytes, its header and shape need {expected_bytes}"
    values = np.frombuffer(data, dtype=encoded_dtype, offset=header)
    if not np.all(np.isfinite(values)):
        return f"adapter tensor {name} has non-finite values"
    return None


def decode(array: Any) -> np.ndarray:
    """The tensor of a payload that passed ``payload_problem``."""
    shape, dtype, _, header = npy_header(bytes(array.data))
    return np.frombuffer(bytes(array.data), dtype=dtype, offset=header).reshape(shape)


def number_problem(key: str, value: Any) -> str | None:
    """Why a reported metric (a number or a list of numbers) is refused: not a number, not
    finite, or larger in magnitude than MAX_REPORTED_MAGNITUDE."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"metric {clean_text(key, 60)} holds a {type(item).__name__}, not a number"
        if not math.isfinite(item) or abs(item) > MAX_REPORTED_MAGNITUDE:
            shown = value if not isinstance(value, list) else f"an entry {item!r}"
            return f"metric {clean_text(key, 60)} is not finite or beyond +-{MAX_REPORTED_MAGNITUDE:g} ({shown})"
    return None


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    for key, value in metrics.items():
        reason = number_problem(key, value)
        if reason:
            return reason
    return None


def texts_problem(texts: Iterable[Any], what: str, limit: int = SAMPLE_TEXT_CHARS) -> str | None:
    """Why sample texts are refused: not strings, or longer than ``limit`` characters."""
    for text in texts:
        if not isinstance(text, str):
            return f"{what} must be strings"
        if len(text) > limit:
            return f"a sample {what[:-1]} has {len(text)} characters, more than {limit}"
    return None
