"""The journal codec: values cross the journal as compact UTF-8 JSON, never pickle (layer: model).

Wire format, **format 1** (stable: it is what the database holds). A value that is plain
JSON encodes as itself, so ``[1, 2, 3]`` is stored as ``[1,2,3]``. Every other value is a
one-key object ``{"$t": [TAG, PAYLOAD]}`` whose payload is itself encoded::

    tuple       {"$t":["tuple",[ITEM,...]]}          a tuple stays a tuple, nested too
    bytes       {"$t":["bytes","<base64>"]}          bytearray decodes as bytes
    set         {"$t":["set",[ITEM,...]]}            items sorted by their encoding
    frozenset   {"$t":["frozenset",[ITEM,...]]}
    dict        {"$t":["dict",[[KEY,VALUE],...]]}    non-str keys, or a "$t" key (escape)
    datetime    {"$t":["datetime","<isoformat>"]}    tzinfo kept as a fixed offset, no fold
    date        {"$t":["date","<isoformat>"]}
    time        {"$t":["time","<isoformat>"]}
    timedelta   {"$t":["timedelta",[DAYS,SECONDS,MICROSECONDS]]}
    Decimal     {"$t":["decimal","<str>"]}
    UUID        {"$t":["uuid","<canonical>"]}
    int         {"$t":["int","<hex>"]}               only beyond 1992 bits (str-digit limits)
    float       {"$t":["float","nan"|"inf"|"-inf"]}  only non-finite: the output is strict JSON
    Enum        {"$t":["enum",["module:qualname",VALUE]]}
    dataclass   {"$t":["dataclass",["module:qualname",{"field":VALUE,...}]]}  init fields only
    pydantic    {"$t":["pydantic",["module:qualname",MODEL_DUMP]]}

Classes are found again by ``module:qualname`` with importlib, and only an ``Enum`` subclass,
a dataclass type or a pydantic ``BaseModel`` subclass is ever called; anything else is a
``DecodeError``. Subclasses of the built-in types above decode as the built-in type.
Errors carry metadata only: type names, tags, class paths and positions, never the value.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import importlib
import json
import math
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from json.scanner import make_scanner
from typing import Any, TypeVar

from unbroken.errors import DecodeError, EncodeError

__all__ = ["FORMAT_VERSION", "decode", "encode"]

FORMAT_VERSION = 1  # the wire format this module writes and reads (module docstring)

_TAG = "$t"
_TAG_TEXT = f'"{_TAG}"'
_PLAIN_SCALARS = frozenset({str, float, bool, type(None)})
_BIG = 1 << 1992  # below 600 decimal digits: under every interpreter's int/str limit
_T = TypeVar("_T")
_D = TypeVar("_D", dt.datetime, dt.time)
_dumps_ascii = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# typeshed types the scanner's context as the scanner class; any decoder is one
_scan: Callable[[str, int], tuple[object, int]] = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
"""``json.loads`` without its whitespace scans: ``(value, end)`` of the value at an index."""


def _make_dumps() -> Callable[[object], str]:
    """Compact JSON, UTF-8 text, no NaN: ``JSONEncoder.encode`` with its C encoder built
    once rather than on every call (the same output; ``json`` keeps the C encoder it
    would build in ``json.encoder.c_make_encoder``)."""
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the encoder's own path
        return encoder.encode
    # No circular-reference markers: a cycle ends in RecursionError, which ``encode``
    # reports, instead of ValueError, which it takes for a non-finite float.
    chunks = make(
        None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False,
        False, False,
    )
    quote = json.encoder.encode_basestring

    def dumps(tree: object) -> str:
        if type(tree) is str:
            return quote(tree)
        return "".join(chunks(tree, 0))

    return dumps


_dumps = _make_dumps()


def encode(value: object, *, what: str = "value") -> bytes:
    """Encode a value as compact UTF-8 JSON in the journal's wire format.

    Args:
        value: the value to journal.
        what: how error messages name the value (``"result of step 3"``).

    Returns:
        The encoded bytes; ``decode`` gives back an equal value of the same type.

    Raises:
        EncodeError: the value (or something inside it) has no encoding.
    """
    if type(value) is int and -_BIG < value < _BIG:
        return b"%d" % value  # the digits JSON writes, without the encoder
    try:
        tree = value if _is_plain(value) else _to_tree(value, what)
        try:
            text = _dumps(tree)
        except ValueError:  # a non-finite float in the fast path: the walk tags it
            tree = _to_tree(value, what)
            text = _dumps(tree)
    except RecursionError:
        raise EncodeError(what, f"{type(value).__name__} (nested too deeply or cyclic)") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: JSON escapes carry them intact
        return _dumps_ascii(tree).encode("ascii")


def decode(data: bytes) -> object:
    """Decode bytes written by ``encode``.

    Args:
        data: the encoded value.

    Returns:
        The value, of the type it was encoded from.

    Raises:
        DecodeError: the bytes are not UTF-8 JSON, or hold a malformed or unknown tag, or
            name a class that cannot be imported or is not of the tagged kind.
    """
    if (  # what ``encode`` writes for an int below 10**18: no UTF-8 or JSON scan needed
        type(data) is bytes
        and data.isdigit()  # ASCII digits only, so no sign, space or underscore for ``int``
        and len(data) < 19
        and (data[0] != 48 or len(data) == 1)  # JSON has no leading zeros
    ):
        return int(data)
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 at byte {exc.start} of {len(data)}") from None
    try:
        tree, end = _scan(text, 0)  # what the journal holds: one JSON value, no whitespace
    except (StopIteration, ValueError, RecursionError):
        end = -1
    if end != len(text):  # anything else: json.loads decides (and words the error)
        tree = _loads(text)
    if _TAG_TEXT not in text:  # fast path: nothing tagged, the JSON value is the value
        return tree
    try:
        return _from_tree(tree)
    except RecursionError:
        raise DecodeError("value nested too deeply") from None


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON ({exc.msg} at {exc.pos} of {len(text)})") from None
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"invalid JSON ({type(exc).__name__})") from None


def _is_plain(value: object) -> bool:
    """Whether the value is plain JSON that encodes as itself (checked before any walk)."""
    if type(value) is int:
        return -_BIG < value < _BIG
    if type(value) is list:
        return all(_is_plain(item) for item in value)
    if type(value) is dict:
        return _TAG not in value and all(type(k) is str and _is_plain(v) for k, v in value.items())
    return type(value) in _PLAIN_SCALARS


def _tag(tag: str, payload: object) -> dict[str, object]:
    return {_TAG: [tag, payload]}


def _to_tree(value: object, what: str) -> object:
    """The JSON tree of a value: plain JSON as is, every other type tagged."""
    encoder = _ENCODERS.get(type(value))
    if encoder is not None:
        return encoder(value, what)
    return _to_tree_special(value, what)


def _to_tree_special(value: object, what: str) -> object:
    cls = type(value)
    if isinstance(value, enum.Enum):
        return _tag("enum", [_class_path(cls, what), _to_tree(value.value, what)])
    if dataclasses.is_dataclass(cls):
        fields = {
            f.name: _to_tree(getattr(value, f.name), what)
            for f in dataclasses.fields(cls)
            if f.init
        }
        return _tag("dataclass", [_class_path(cls, what), fields])
    pydantic = sys.modules.get("pydantic")  # never imported here: only if the app uses it
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        exclude = set(cls.model_computed_fields) or None  # type: ignore[attr-defined]
        data = value.model_dump(mode="python", round_trip=True, exclude=exclude)
        return _tag("pydantic", [_class_path(cls, what), _to_tree(data, what)])
    for base in cls.__mro__[1:]:
        encoder = _ENCODERS.get(base)
        if encoder is not None:
            return encoder(value, what)
    module = "" if cls.__module__ == "builtins" else f"{cls.__module__}."
    raise EncodeError(what, module + cls.__qualname__)


def _class_path(cls: type, what: str) -> str:
    if "<locals>" in cls.__qualname__:
        raise EncodeError(what, f"{cls.__qualname__} (defined in a function: not importable)")
    return f"{cls.__module__}:{cls.__qualname__}"


def _dict_tree(value: Any, what: str) -> object:
    if _TAG not in value and all(type(k) is str for k in value):
        return {k: _to_tree(v, what) for k, v in value.items()}
    return _tag("dict", [[_to_tree(k, what), _to_tree(v, what)] for k, v in value.items()])


def _sorted_tree(value: Any, what: str) -> list[object]:
    return sorted((_to_tree(item, what) for item in value), key=_dumps)  # deterministic bytes


def _scalar(tag: str, to_json: Callable[[Any], object]) -> Callable[[Any, str], object]:
    return lambda value, _: _tag(tag, to_json(value))


_ENCODERS: dict[type, Callable[[Any, str], object]] = {
    str: lambda value, what: value,
    bool: lambda value, what: value,
    type(None): lambda value, what: value,
    int: lambda value, what: value if -_BIG < value < _BIG else _tag("int", format(value, "x")),
    float: lambda value, what: value if math.isfinite(value) else _tag("float", repr(value)),
    list: lambda value, what: [_to_tree(item, what) for item in value],
    dict: _dict_tree,
    tuple: lambda value, what: _tag("tuple", [_to_tree(item, what) for item in value]),
    set: lambda value, what: _tag("set", _sorted_tree(value, what)),
    frozenset: lambda value, what: _tag("frozenset", _sorted_tree(value, what)),
    bytes: _scalar("bytes", lambda v: base64.b64encode(v).decode()),
    bytearray: _scalar("bytes", lambda v: base64.b64encode(v).decode()),
    dt.datetime: _scalar("datetime", lambda v: v.isoformat()),
    dt.date: _scalar("date", lambda v: v.isoformat()),
    dt.time: _scalar("time", lambda v: v.isoformat()),
    dt.timedelta: _scalar("timedelta", lambda v: [v.days, v.seconds, v.microseconds]),
    Decimal: _scalar("decimal", str),
    uuid.UUID: _scalar("uuid", str),
}


def _from_tree(tree: object) -> object:
    if type(tree) is list:
        return [_from_tree(item) for item in tree]
    if type(tree) is dict:
        return _untag(tree) if _TAG in tree else {k: _from_tree(v) for k, v in tree.items()}
    return tree


def _untag(tree: dict[str, object]) -> object:
    body = tree[_TAG]
    if len(tree) != 1 or type(body) is not list or len(body) != 2 or type(body[0]) is not str:
        raise DecodeError("malformed codec tag")
    tag, payload = body
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise DecodeError(f"unknown codec tag {tag[:40]!r} (written by a newer format?)")
    try:
        return decoder(payload)
    except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
        raise DecodeError(f"malformed {tag!r} value ({type(exc).__name__})") from None


def _as(value: object, kind: type[_T]) -> _T:
    if type(value) is not kind:
        raise TypeError(kind.__name__)
    return value


def _dict_from_pairs(payload: object) -> dict[object, object]:
    pairs = [_as(pair, list) for pair in _as(payload, list)]
    return {_from_tree(k): _from_tree(v) for k, v in pairs}


def _from_iso(cls: type[_D], text: str) -> _D:
    value = cls.fromisoformat(text)
    # CPython 3.11 reads an offset under one second ("+00:00:00.000001") as UTC: redo it.
    if len(text) > 16 and text[-16] in "+-" and text[-15:-6] == "00:00:00.":
        offset = dt.timedelta(microseconds=int(text[-6:])) * (-1 if text[-16] == "-" else 1)
        value = value.replace(tzinfo=dt.timezone(offset))
    return value


def _load_class(path: object, kind: str, check: Callable[[type], bool]) -> type:
    """Import ``module:qualname`` and insist it is a class of the tagged kind."""
    if type(path) is not str or path.count(":") != 1:
        raise DecodeError(f"malformed class path in {kind} value")
    shown = path[:200]
    module_name, _, qualname = path.partition(":")
    try:
        found: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        raise DecodeError(f"class {shown!r} cannot be imported") from None
    if not (isinstance(found, type) and check(found)):
        raise DecodeError(f"{shown!r} is not {kind} class")
    return found


def _classed(
    kind: str, check: Callable[[type], bool], build: Callable[[Any, object], object]
) -> Callable[[object], object]:
    """A decoder for ``[class path, data]`` payloads that rebuilds only checked classes."""

    def decode_classed(payload: object) -> object:
        path, data = _as(payload, list)
        cls = _load_class(path, kind, check)
        try:
            return build(cls, data)
        except DecodeError:
            raise
        except Exception as exc:  # user code: report its type, never its message (payload)
            raise DecodeError(
                f"rebuilding {cls.__qualname__} failed ({type(exc).__name__})"
            ) from None

    return decode_classed


def _is_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


_DECODERS: dict[str, Callable[[object], object]] = {
    "tuple": lambda p: tuple(_from_tree(item) for item in _as(p, list)),
    "set": lambda p: {_from_tree(item) for item in _as(p, list)},
    "frozenset": lambda p: frozenset(_from_tree(item) for item in _as(p, list)),
    "dict": _dict_from_pairs,
    "bytes": lambda p: base64.b64decode(_as(p, str), validate=True),
    "datetime": lambda p: _from_iso(dt.datetime, _as(p, str)),
    "date": lambda p: dt.date.fromisoformat(_as(p, str)),
    "time": lambda p: _from_iso(dt.time, _as(p, str)),
    "timedelta": lambda p: dt.timedelta(*(_as(n, int) for n in _as(p, list)[:3])),
    "decimal": lambda p: Decimal(_as(p, str)),
    "uuid": lambda p: uuid.UUID(_as(p, str)),
    "int": lambda p: int(_as(p, str), 16),
    "float": lambda p: float(_as(p, str)),
    "enum": _classed("an Enum", lambda c: issubclass(c, enum.Enum), lambda c, v: c(_from_tree(v))),
    "dataclass": _classed(
        "a dataclass",
        dataclasses.is_dataclass,
        lambda c, v: c(**{_as(k, str): _from_tree(x) for k, x in _as(v, dict).items()}),
    ),
    "pydantic": _classed(
        "a pydantic model", _is_model, lambda c, v: c.model_validate(_from_tree(v))
    ),
}
