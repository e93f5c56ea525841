"""Turn a record's JSON schema (OpenAPI flavour) into a fast generator of plausible values.

A schema is compiled once into a tree of closures; each closure draws from a `random.Random`
that the caller seeds per record version, so the same version always renders the same bytes.
Strings are chosen by property name (names, addresses, phones, memo text) so that records look
and weigh like ServiceTitan's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from random import Random
from typing import Any

Gen = Callable[[Random], Any]

# Generated dates fall between these instants (2019-01-01 and 2025-01-01, UTC).
_DATE_LO = 1546300800
_DATE_SPAN = 1735689600 - _DATE_LO
TICKS_PER_SECOND = 10_000_000  # .NET ticks: ServiceTitan writes up to 7 fractional digits


def _vocabulary(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _vocabulary(
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Carlos Maria Wei Priya Ahmed Olga Kenji Aisha"
)
_LAST = _vocabulary(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Nguyen Patel Kim Okafor"
)
_STREETS = _vocabulary("Oak Maple Cedar Pine Elm Washington Lake Hill Sunset Park Main Ridge")
_SUFFIX = ("St", "Ave", "Blvd", "Dr", "Ln", "Ct", "Way", "Rd")
_CITIES = (
    ("Glendale", "CA", "91203"),
    ("Austin", "TX", "78701"),
    ("Phoenix", "AZ", "85004"),
    ("Denver", "CO", "80202"),
    ("Tampa", "FL", "33602"),
    ("Columbus", "OH", "43215"),
    ("Raleigh", "NC", "27601"),
    ("Boise", "ID", "83702"),
)
_WORDS = _vocabulary(
    "service repair install replace inspect furnace boiler condenser filter thermostat duct "
    "leak drain water heater pipe valve panel breaker outlet wiring compressor coil refrigerant "
    "maintenance estimate warranty customer technician callback follow-up parts labor unit "
    "system upstairs basement attic garage kitchen bathroom annual tune-up emergency"
)
_COMPANY = ("Plumbing", "Heating & Air", "Electric", "Home Services", "Mechanical", "Roofing")
_STATUSES = ("Active", "Pending", "Completed", "Scheduled", "Canceled", "InProgress", "Hold")
_EVENTS = (
    "Job Created",
    "Appointment Scheduled",
    "Technician Assigned",
    "Technician Dispatched",
    "Working",
    "Job On Hold",
    "Appointment Rescheduled",
    "Job Completed",
)
_COLORS = ("#1E90FF", "#FF8C00", "#2E8B57", "#8A2BE2", "#DC143C", "#708090")

_MONEY_WORDS = _vocabulary("amount total price cost balance tax subtotal quantity hours rate")
_TEXT_WORDS = ("memo", "summary", "description", "note", "text", "instructions", "comment")


def format_ticks(ticks: int) -> str:
    """ServiceTitan's date-time form: UTC, 'Z', up to 7 fractional digits, zeros trimmed."""
    seconds, frac = divmod(ticks, TICKS_PER_SECOND)
    head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac == 0:
        return head + "Z"
    return f"{head}.{frac:07d}".rstrip("0") + "Z"


def _datetime(rng: Random) -> str:
    return format_ticks(int(_DATE_LO * TICKS_PER_SECOND + rng.random() * _DATE_SPAN * 1e7))


def _date(rng: Random) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(_DATE_LO + int(rng.random() * _DATE_SPAN)))


def _duration(rng: Random) -> str:
    minutes = int(rng.random() * 480)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _person(rng: Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _company(rng: Random) -> str:
    return f"{rng.choice(_LAST)} {rng.choice(_COMPANY)}"


def _email(rng: Random) -> str:
    domain = rng.choice(("example.com", "mail.example.net", "example.org"))
    user = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{int(rng.random() * 99)}".lower()
    return f"{user}@{domain}"


def _phone(rng: Random) -> str:
    return f"{200 + int(rng.random() * 799)}{int(rng.random() * 10_000_000):07d}"


def _street(rng: Random) -> str:
    return f"{1 + int(rng.random() * 9899)} {rng.choice(_STREETS)} {rng.choice(_SUFFIX)}"


def _words(rng: Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(low + int(rng.random() * (high - low + 1))))


def _sentences(rng: Random) -> str:
    count = 1 + int(rng.random() * 3)
    return " ".join(_words(rng, 4, 12).capitalize() + "." for _ in range(count))


def _html(rng: Random) -> str:
    return f"<p>{_sentences(rng)}</p>"


def _multiline(rng: Random) -> str:
    return "\n".join(_words(rng, 3, 8).capitalize() + "." for _ in range(1 + int(rng.random() * 3)))


def _money_text(rng: Random) -> str:
    return f"{rng.random() * 2500:.2f}"


def _title(rng: Random) -> str:
    return _words(rng, 1, 3).title()


def _string_for(name: str) -> Gen:
    """A generator for a plain string property, picked from its name."""
    low = name.lower()
    city: Gen = lambda rng: rng.choice(_CITIES)[0]  # noqa: E731
    table: list[tuple[Callable[[str], bool], Gen]] = [
        (lambda n: "email" in n, _email),
        (lambda n: "phone" in n or "callerid" in n or n in ("from", "to"), _phone),
        (lambda n: n == "firstname", lambda rng: rng.choice(_FIRST)),
        (lambda n: n == "lastname", lambda rng: rng.choice(_LAST)),
        (lambda n: "customername" in n or "technicianname" in n or n == "createdby", _person),
        (lambda n: n in ("name", "displayname", "officialname", "vendorname"), _company),
        (lambda n: "street" in n or n == "locationaddress", _street),
        (lambda n: n.endswith("unit"), lambda rng: f"Apt {1 + int(rng.random() * 40)}"),
        (lambda n: n.endswith("city"), city),
        (lambda n: n.endswith("state"), lambda rng: rng.choice(_CITIES)[1]),
        (lambda n: n.endswith("zip"), lambda rng: rng.choice(_CITIES)[2]),
        (lambda n: n.endswith("country"), lambda rng: "USA"),
        (lambda n: "url" in n or "path" in n, lambda rng: f"https://files.example.com/{_id(rng)}"),
        (lambda n: "color" in n, lambda rng: rng.choice(_COLORS)),
        (lambda n: n == "currency", lambda rng: "USD"),
        (lambda n: any(w in n for w in _MONEY_WORDS), _money_text),
        (lambda n: any(w in n for w in _TEXT_WORDS), _sentences),
        (lambda n: "number" in n, lambda rng: str(10_000 + int(rng.random() * 9_990_000))),
        (lambda n: "code" in n or n == "sku", lambda rng: f"{_title(rng)[:4].upper()}-{_id(rng)}"),
        (lambda n: "status" in n, lambda rng: rng.choice(_STATUSES)),
        (lambda n: n == "eventtype", lambda rng: rng.choice(_EVENTS)),
        (lambda n: n.endswith("id"), lambda rng: f"{int(rng.random() * 2**48):012x}"),
        (lambda n: n.endswith("name"), _title),
    ]
    for match, gen in table:
        if match(low):
            return gen
    return _title


def _id(rng: Random) -> int:
    return 10_000 + int(rng.random() * 150_000_000)


def _integer_for(name: str, fmt: str | None) -> Gen:
    low = name.lower()
    if low == "id" or low.endswith(("id", "ids")) or (fmt == "int64" and "id" in low):
        return _id
    if fmt == "int64":
        return lambda rng: int(rng.random() * 5000)
    return lambda rng: int(rng.random() * 100)


def _number_for(name: str) -> Gen:
    low = name.lower()
    if "latitude" in low:
        return lambda rng: round(25 + rng.random() * 23, 6)
    if "longitude" in low:
        return lambda rng: round(-122 + rng.random() * 50, 6)
    if "rating" in low:
        return lambda rng: float(1 + int(rng.random() * 5))
    if "percent" in low or "rate" in low:
        return lambda rng: round(rng.random() * 100, 2)
    return lambda rng: round(rng.random() * 2500, 2)


def _nullable(gen: Gen, null_share: float) -> Gen:
    def maybe(rng: Random) -> Any:
        return None if rng.random() < null_share else gen(rng)

    return maybe


def _enum(values: list[Any]) -> Gen:
    return lambda rng: rng.choice(values)


def _array(item: Gen, low: int, high: int) -> Gen:
    def many(rng: Random) -> list[Any]:
        return [item(rng) for _ in range(low + int(rng.random() * (high - low + 1)))]

    return many


def _object(fields: list[tuple[str, Gen]]) -> Gen:
    def build(rng: Random) -> dict[str, Any]:
        return {name: gen(rng) for name, gen in fields}

    return build


def compile_schema(schema: dict[str, Any], name: str = "") -> Gen:
    """A generator of values valid against `schema`; `name` is the property it fills."""
    gen = _compile_inner(schema, name)
    if schema.get("nullable"):
        share = 0.3 if "oneOf" in schema or schema.get("type") == "object" else 0.2
        return _nullable(gen, share)
    return gen


def _compile_inner(schema: dict[str, Any], name: str) -> Gen:
    if "oneOf" in schema:
        # ServiceTitan's documents wrap every referenced type in a one-element oneOf.
        return compile_schema(schema["oneOf"][0], name)
    if "enum" in schema:
        return _enum(list(schema["enum"]))
    kind = schema.get("type")
    fmt = schema.get("format")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return _object([(key, compile_schema(sub, key)) for key, sub in props.items()])
    if kind == "array":
        items = schema.get("items", {})
        if "$recursive" in items:
            return lambda rng: []
        item = compile_schema(items, name.removesuffix("s"))
        small = items.get("type") in ("integer", "string")
        return _array(item, 0, 3 if small else 2)
    if kind == "integer":
        return _integer_for(name, fmt)
    if kind == "number":
        return _number_for(name)
    if kind == "boolean":
        return lambda rng: rng.random() < 0.5
    if kind == "string":
        special: dict[str, Gen] = {
            "date-time": _datetime,
            "date": _date,
            "duration": _duration,
            "email": _email,
            "phone": _phone,
            "html": _html,
            "multiline": _multiline,
        }
        if fmt in special:
            return special[fmt]
        return _string_for(name)
    return lambda rng: None
