"""Malformed request bodies for the servers' fuzz tests: a valid body with one part replaced by something a
careless or hostile client sends (lone surrogates, 5,000-digit numbers, deep nesting, huge lists, wrong types,
truncated or non-UTF-8 bytes). Raw JSON text is spliced in, so that values Python's json cannot write (a lone
surrogate escape, a number past Python's digit limit, NaN) reach the server exactly as a client sends them."""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import quote_plus

FRAGMENTS = [
    '"\\ud800"', '"a\\udfffb"', '"\\ud83d"', '"\\u0000"', '"\\uffff"',
    "9" * 5000, "-" + "9" * 5000, "1" + "0" * 30, "1e999", "-1e999", "NaN", "Infinity", "-0", "1e-400", "0.5",
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 100_000,
    "[" * 40 + "1" + "]" * 40,
    "null", "true", "false", '""', '" "', "[]", "{}", '"x"', "0", "-1", "3", "2.5", '"' + "y" * 50_000 + '"',
    "[" + ",".join(['"s"'] * 20_000) + "]", "[" + ",".join(["1"] * 50) + "]",
    '{"role":"user","content":"hi"}', '[{"type":"image_url"}]', '[{"type":"text","text":7}]', "[1,2]",
    '["a","b"]', '{"x":[]}', '"\\u00e9t\\u00e9"', '"<script>alert(1)</script>"',
]
PLACEHOLDER = "\u0001FUZZ\u0001"


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (the value itself included)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths(item, (*prefix, i))
    return out


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def splice(value: Any, fragment: str) -> bytes:
    return json.dumps(value, ensure_ascii=True).replace(json.dumps(PLACEHOLDER), fragment).encode()


def json_bodies(bases: list[dict], n: int, seed: int) -> list[bytes]:
    """n malformed bodies made from the valid `bases`."""
    rng = random.Random(seed)
    out: list[bytes] = []
    while len(out) < n:
        base = rng.choice(bases)
        roll = rng.random()
        if roll < 0.55:  # one value replaced by a raw fragment
            out.append(splice(replaced(base, rng.choice(paths(base)), PLACEHOLDER), rng.choice(FRAGMENTS)))
        elif roll < 0.65:  # an extra field
            out.append(splice({**base, rng.choice(["extra", "__proto__", "role", "id", "n"]): PLACEHOLDER},
                              rng.choice(FRAGMENTS)))
        elif roll < 0.75:  # truncated
            text = json.dumps(base).encode()
            out.append(text[: rng.randrange(len(text))])
        elif roll < 0.85:  # bytes that are not UTF-8, or a BOM, spliced in
            text = json.dumps(base).encode()
            at = rng.randrange(len(text) + 1)
            junk = rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\xef\xbb\xbf", b"\x00"])
            out.append(text[:at] + junk + text[at:])
        elif roll < 0.92:  # not an object at all
            out.append(rng.choice(FRAGMENTS).encode())
        else:  # a key that is not valid Unicode, or duplicated keys
            text = json.dumps(base)
            out.append(("{" + rng.choice(['"\\udc00": 1, ', '"a": 1, "a": ', '"": null, ']) + text[1:]).encode()
                       if not text.startswith('{"a": 1, "a": ') else text.encode())
    return out


FORM_VALUES = ["%ED%A0%80", "%FF%FE", "%C3", "%00", "9" * 5000, "-" + "9" * 30, "", "+", "%", "%zz",
               "x" * 50_000, "1e9", "-1", "0", "NaN", "%E2%82%AC", "<script>", "\xe9".encode().decode("latin-1")]


def form_bodies(bases: list[dict[str, str]], n: int, seed: int) -> list[tuple[bytes, str]]:
    """n malformed url-encoded forms (body, content type) made from the valid `bases` (field -> value)."""
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    while len(out) < n:
        fields = [(k, quote_plus(v)) for k, v in rng.choice(bases).items()]
        roll = rng.random()
        if roll < 0.6 and fields:
            i = rng.randrange(len(fields))
            fields[i] = (fields[i][0], rng.choice(FORM_VALUES))
        elif roll < 0.7:
            fields.append((rng.choice(["%ED%A0%80", "extra", "csrf", "overlap", "rank-0", "flag"]),
                           rng.choice(FORM_VALUES)))
        elif roll < 0.75:
            fields *= 3000  # many fields
        elif roll < 0.8 and fields:
            fields.pop(rng.randrange(len(fields)))
        text = "&".join(f"{k}={v}" for k, v in fields)
        if rng.random() < 0.05:
            text = text.replace("=", "", 1)
        content_type = "application/x-www-form-urlencoded"
        if rng.random() < 0.07:
            content_type = rng.choice(["multipart/form-data; boundary=x", "application/json", "text/plain", ""])
        out.append((text.encode("latin-1", "replace"), content_type))
    return out
