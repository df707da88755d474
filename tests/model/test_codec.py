"""The journal codec: values cross the journal as JSON and come back with their types."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import socket
import subprocess
import sys
import uuid
from decimal import Decimal
from typing import Any, TypeVar

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.codec import FORMAT_VERSION, decode, encode
from unbroken.errors import DecodeError, EncodeError

# --- importable types for the class-tagged encodings ------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = (1, 2)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Perm(enum.Flag):
    R = 4
    W = 2


@dataclasses.dataclass
class Point:
    x: int
    y: float


@dataclasses.dataclass(frozen=True)
class Line:
    start: Point
    end: Point
    label: tuple[str, ...] = ()
    length_cache: float = dataclasses.field(default=0.0, init=False)


@dataclasses.dataclass
class Box:
    content: Any


@dataclasses.dataclass
class Touchy:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"SECRET-{self.value}")


class Address(pydantic.BaseModel):
    city: str
    zip: str | None = None


class Customer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str
    joined: dt.datetime
    tags: tuple[str, ...]
    address: Address
    balance: Decimal

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def initial(self) -> str:
        return self.name[:1]


class Outer:
    @dataclasses.dataclass
    class Inner:
        n: int


class Secret:
    def __repr__(self) -> str:
        return "SECRET"

    def __str__(self) -> str:
        return "SECRET"


# --- helpers -----------------------------------------------------------------------------


def assert_same(got: object, want: object) -> None:
    """Equal values of identical types, all the way down."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, list | tuple):
        assert len(got) == len(want)  # type: ignore[arg-type]
        for g, w in zip(got, want, strict=True):  # type: ignore[call-overload]
            assert_same(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        assert len(got) == len(want)
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert_same(gk, wk)
            assert_same(gv, wv)
    elif isinstance(want, set | frozenset):
        assert got == want
        for w in want:  # equal elements of a set are unique: pair them up by equality
            assert_same(next(g for g in got if g == w), w)  # type: ignore[attr-defined]
    elif dataclasses.is_dataclass(want):
        for field in dataclasses.fields(want):
            assert_same(getattr(got, field.name), getattr(want, field.name))
    elif isinstance(want, pydantic.BaseModel):
        for name in type(want).model_fields:
            assert_same(getattr(got, name), getattr(want, name))
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == want
        if not isinstance(want, int):  # repr tells Decimal("1.1") from "1.10", -0.0 from 0.0
            assert repr(got) == repr(want)


def roundtrip(value: object) -> object:
    data = encode(value)
    assert isinstance(data, bytes)
    data.decode("utf-8")
    json.loads(data, parse_constant=_reject_constant)  # strict JSON: no NaN/Infinity tokens
    back = decode(data)
    assert_same(back, value)
    return back


def _reject_constant(name: str) -> object:
    raise AssertionError(f"non-standard JSON constant {name}")


PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

EXAMPLES: list[object] = [
    None,
    True,
    False,
    0,
    -17,
    2**64,
    -(2**200),
    10**1000,
    -(2**20000),
    0.1,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    "",
    "héllo wörld ✓ \U0001f600",
    "lone \ud800 surrogate",
    [],
    [1, 2, 3],
    {},
    {"a": 1, "b": [None, True]},
    (),
    (1,),
    (1, "a", None),
    b"",
    b"\x00\xff binary",
    dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
    dt.datetime(2024, 2, 29, 12, 0, 0, 123456, tzinfo=dt.UTC),
    dt.datetime(1999, 12, 31, 1, 2, 3, 4, tzinfo=PLUS_0530),
    dt.datetime(2000, 1, 1, tzinfo=dt.timezone(dt.timedelta(microseconds=-1))),
    dt.time(0, 0, tzinfo=dt.timezone(dt.timedelta(microseconds=500_000))),
    dt.date(2024, 1, 31),
    dt.time(13, 14, 15, 161718),
    dt.time(1, 2, tzinfo=PLUS_0530),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    dt.timedelta(0),
    Decimal("1.10"),
    Decimal("-0"),
    Decimal("1E+30"),
    Decimal("Infinity"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.uuid4(),
    {1, 2, 3},
    {"a", "b"},
    set(),
    frozenset({(1, 2), "x"}),
    frozenset(),
    {1: "one", 2: "two"},
    {(1, 2): "pair", None: "none", 1.5: "float"},
    {frozenset({1}): {True: False}},
    Color.RED,
    Color.BLUE,
    Level.HIGH,
    Mode.SAFE,
    Perm.R | Perm.W,
    Point(1, 2.5),
    Line(Point(0, 0.0), Point(3, 4.0), ("a", "b")),
    Outer.Inner(7),
    Box([Point(1, 1.0), (Level.LOW, b"x")]),
    Address(city="Oslo"),
    Customer(
        name="Ada",
        joined=dt.datetime(2020, 5, 17, 8, 0, tzinfo=PLUS_0530),
        tags=("vip", "beta"),
        address=Address(city="Oslo", zip="0150"),
        balance=Decimal("10.50"),
    ),
]


# --- round trips -------------------------------------------------------------------------


def test_format_version_is_pinned() -> None:
    assert FORMAT_VERSION == 1


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_each_supported_type_round_trips_with_its_type(value: object) -> None:
    roundtrip(value)


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_each_supported_type_round_trips_inside_containers(value: object) -> None:
    roundtrip([value, (value,), {"k": value}, Box(value)])


def test_nan_round_trips_as_a_float() -> None:
    back = roundtrip(float("nan"))
    assert isinstance(back, float) and math.isnan(back)
    assert decode(encode([1.0, float("nan")]))[1] != 0  # type: ignore[index]


def test_bytearray_decodes_as_bytes() -> None:
    back = decode(encode(bytearray(b"abc")))
    assert type(back) is bytes and back == b"abc"


def test_tuples_stay_tuples_inside_lists_and_dicts() -> None:
    value = {"a": [(1, 2), ((3,), [4, (5, 6)])], "b": ({"c": (7,)},)}
    back = roundtrip(value)
    assert isinstance(back, dict)
    assert type(back["a"][0]) is tuple
    assert type(back["a"][1][1][1]) is tuple
    assert type(back["b"][0]["c"]) is tuple


def test_aware_datetime_keeps_its_offset() -> None:
    value = dt.datetime(2021, 3, 4, 5, 6, 7, 890123, tzinfo=PLUS_0530)
    back = decode(encode(value))
    assert isinstance(back, dt.datetime)
    assert back.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert back.microsecond == 890123


def test_dataclass_init_false_field_is_recomputed_not_passed() -> None:
    back = roundtrip(Line(Point(1, 2.0), Point(3, 4.0)))
    assert isinstance(back, Line) and type(back.start) is Point


def test_pydantic_model_rebuilt_with_nested_types() -> None:
    customer = EXAMPLES[-1]
    back = roundtrip(customer)
    assert isinstance(back, Customer)
    assert type(back.address) is Address
    assert type(back.tags) is tuple
    assert back.joined.utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_subclasses_of_builtins_decode_as_the_builtin() -> None:
    class Name(str):
        pass

    back = decode(encode({"n": Name("x")}))
    assert back == {"n": "x"} and type(back["n"]) is str  # type: ignore[index]


# --- "$t" escaping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"$t": 1},
        {"$t": ["tuple", [1, 2]]},
        {"$t": ["dataclass", ["os:system", {}]]},
        {"$t": "x", "other": 2},
        [{"$t": {"$t": None}}],
        ("$t", {"$t": ("$t",)}),
    ],
)
def test_user_dicts_with_the_tag_key_round_trip(value: object) -> None:
    roundtrip(value)


# --- plain JSON stays plain --------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        42,
        -1.5,
        "text ✓",
        [1, 2, 3],
        {"a": 1, "b": "two", "c": None},
        {"nested": [{"deep": [1, {"x": False}]}], "empty": {}},
        [[], [[]], {"": ""}],
    ],
)
def test_plain_json_values_encode_as_themselves(value: object) -> None:
    data = encode(value)
    assert json.loads(data) == value
    assert data == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert_same(decode(data), value)


@given(st.integers(min_value=-(1 << 1992) + 1, max_value=(1 << 1992) - 1))
def test_an_int_is_its_json_digits(value: int) -> None:
    assert encode(value) == json.dumps(value).encode()
    assert decode(encode(value)) == value


@given(st.text(alphabet="0123456789-+_ .e\u0660\u00b2", max_size=22))
def test_digit_like_bytes_decode_exactly_as_json_loads_reads_them(text: str) -> None:
    data = text.encode()
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(DecodeError):
            decode(data)
    else:
        assert_same(decode(data), expected)


def test_list_of_ints_is_just_a_json_array() -> None:
    assert encode([1, 2, 3]) == b"[1,2,3]"


def test_set_encoding_is_deterministic() -> None:
    a = {"pear", "apple", "fig", "kiwi", "plum"}
    b = set(sorted(a, reverse=True))
    assert encode(a) == encode(b)


# --- encode errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (lambda: None, "function"),
        (object(), "object"),
        ([1, {"k": object()}], "object"),
        (Secret(), "Secret"),
        ({"x": (Secret(),)}, "Secret"),
        (Box(Secret()), "Secret"),
    ],
)
def test_unsupported_values_raise_encode_error_naming_the_type(
    value: object, type_name: str
) -> None:
    with pytest.raises(EncodeError) as info:
        encode(value, what="result of step 3")
    message = str(info.value)
    assert type_name in info.value.type_name
    assert "result of step 3" in message
    assert "SECRET" not in message
    assert isinstance(info.value, TypeError)


def test_a_socket_is_not_encodable() -> None:
    with socket.socket() as sock, pytest.raises(EncodeError) as info:
        encode({"conn": sock})
    assert "socket" in info.value.type_name


def test_a_class_defined_in_a_function_is_refused_at_encode_time() -> None:
    @dataclasses.dataclass
    class Local:
        n: int

    with pytest.raises(EncodeError) as info:
        encode(Local(1))
    assert "<locals>" in info.value.type_name


def test_a_cyclic_value_raises_encode_error() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(EncodeError):
        encode(cyclic)


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b" 1", 1),
        (b"[1, 2]\n", [1, 2]),
        (b'\t{"a": [1, {"b": null}]} ', {"a": [1, {"b": None}]}),
        (b' {"$t":["tuple",[1, 2]]}\r\n', (1, 2)),
        (b"NaN", None),  # json.loads accepts it; only the type is compared below
    ],
)
def test_json_around_whitespace_decodes_as_json_loads_reads_it(data: bytes, value: object) -> None:
    found = decode(data)
    if value is None:
        assert isinstance(found, float) and math.isnan(found)
    else:
        assert found == value and type(found) is type(value)


# --- decode errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\x00garbage",
        b"",
        b'{"a": [1, 2',
        b'{"SECRET": ',
        b"not json SECRET",
        b"1 SECRET",
        b'[1] {"SECRET": 2}',
        b"\xef\xbb\xbf[1]",
        b'{"$t":["no-such-tag",1]}',
        b'{"$t":["tuple",[1]],"extra":1}',
        b'{"$t":"tuple"}',
        b'{"$t":["tuple"]}',
        b'{"$t":[7,[1]]}',
        b'{"$t":["tuple","SECRET"]}',
        b'{"$t":["bytes","!!SECRET!!"]}',
        b'{"$t":["datetime","SECRET"]}',
        b'{"$t":["decimal","SECRET"]}',
        b'{"$t":["uuid","SECRET"]}',
        b'{"$t":["timedelta",["SECRET",0,0]]}',
        b'{"$t":["set",[[1]]]}',
        b'{"$t":["dict",[[1]]]}',
        b'{"$t":["dict",[{"a":1}]]}',
        b'{"$t":["int","SECRET"]}',
        f'[{{"$t":["enum",["{__name__}:Color","SECRET"]]}}]'.encode(),
    ],
)
def test_bad_bytes_raise_decode_error_without_the_payload(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    "path",
    ["no_such_module_for_codec_tests:Thing", "os:NoSuchThing", "os", "a:b:c", "", ":x"],
)
def test_a_class_that_cannot_be_imported_raises_decode_error(path: str) -> None:
    data = json.dumps({"$t": ["dataclass", [path, {}]]}).encode()
    with pytest.raises(DecodeError) as info:
        decode(data)
    if path.count(":") == 1 and path[0] != ":":
        assert path in str(info.value)


@pytest.mark.parametrize("tag", ["dataclass", "enum", "pydantic"])
@pytest.mark.parametrize("path", ["os:system", "builtins:eval", "subprocess:Popen"])
def test_a_class_path_that_is_not_of_the_tagged_kind_is_never_called(
    tag: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    payload: object = {"command": "echo pwned"} if tag != "enum" else "echo pwned"
    data = json.dumps({"$t": [tag, [path, payload]]}).encode()
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert calls == []
    assert "pwned" not in str(info.value)


def test_a_dataclass_under_another_tag_is_refused() -> None:
    data = json.dumps({"$t": ["enum", [f"{__name__}:Point", 1]]}).encode()
    with pytest.raises(DecodeError, match="not an Enum class"):
        decode(data)


def test_a_failing_constructor_is_reported_by_type_not_message() -> None:
    path = f"{Touchy.__module__}:Touchy"
    data = json.dumps({"$t": ["dataclass", [path, {"value": -5}]]}).encode()
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert "ValueError" in str(info.value)
    assert "SECRET" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_pydantic_validation_failure_is_a_decode_error() -> None:
    data = json.dumps(
        {"$t": ["pydantic", [f"{Address.__module__}:Address", {"city": ["SECRET"]}]]}
    ).encode()
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert "SECRET" not in str(info.value)


def test_importing_the_codec_does_not_import_pydantic() -> None:
    code = "import sys, unbroken.codec; sys.exit(1 if 'pydantic' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_DT = TypeVar("_DT", dt.datetime, dt.time)

# --- properties --------------------------------------------------------------------------


def _no_fold(value: _DT) -> _DT:
    """``fold`` is not journaled (the tz offset is): equal, but ``repr`` shows it."""
    return value.replace(fold=0)


_offsets = st.timedeltas(
    min_value=dt.timedelta(hours=-23, minutes=59), max_value=dt.timedelta(hours=23, minutes=59)
)
_tzs = st.none() | st.just(dt.UTC) | st.builds(dt.timezone, _offsets)

hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**3000), max_value=2**3000)
    | st.floats(allow_nan=False)
    | st.text()
    | st.just("$t")
    | st.binary(max_size=16)
    | st.dates()
    | st.datetimes(timezones=_tzs).map(_no_fold)
    | st.times(timezones=_tzs).map(_no_fold)
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.sampled_from([*Color, *Level, *Mode, Perm.R, Perm.R | Perm.W])
)

hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)

scalars = (
    hashable_scalars
    | st.binary(max_size=16).map(bytearray).map(bytes)
    | st.builds(Point, st.integers(), st.floats(allow_nan=False))
)


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    keys = st.text(max_size=5) | st.just("$t")
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
        | st.dictionaries(hashables, children, max_size=3)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
        | st.builds(Box, children)
        | st.builds(
            Line,
            st.builds(Point, st.integers(), st.floats(allow_nan=False)),
            st.builds(Point, st.integers(), st.floats(allow_nan=False)),
            st.lists(st.text(max_size=3), max_size=2).map(tuple),
        )
    )


values = st.recursive(scalars, _containers, max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(values)
def test_property_nested_values_round_trip(value: object) -> None:
    roundtrip(value)


@settings(max_examples=200, deadline=None)
@given(values)
def test_property_encoding_is_stable(value: object) -> None:
    data = encode(value)
    assert encode(decode(data)) == data


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    # "$t" is the one key the codec escapes; plain JSON never needs it
    lambda c: st.lists(c, max_size=4)
    | st.dictionaries(st.text(max_size=5).filter(lambda k: k != "$t"), c, max_size=4),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(_plain)
def test_property_plain_json_is_plain(value: object) -> None:
    data = encode(value)
    assert json.loads(data) == value
    assert_same(decode(data), value)
