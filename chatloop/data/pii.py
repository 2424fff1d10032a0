"""Personally identifiable information (PII) in prompts: detection with checksums, and redaction.

Detectors (docs/PROMPTS.md lists the formats and the near-misses each one deliberately ignores):

- `email`: `local+tag@sub.domain.tld`, Unicode letters allowed; needs a TLD.
- `card`: 13-19 digits, contiguous or grouped 4-4-4-4(-3) / 4-6-5 with one kind of separator; Luhn check.
- `iban`: country, 2 check digits, up to 30 letters/digits, spaced or not; mod-97 check and the registry
  length of the country.
- `national_id`: US SSN `123-45-6789` / `123 45 6789` (no 000/666/9xx area, 00 group, 0000 serial);
  UK National Insurance numbers `AB 12 34 56 C`.
- `ip`: IPv4 (octets 0-255, no leading zeros), IPv6 (every form Python's ipaddress accepts).
- `phone`: `+CC ...` or `00CC ...` (8-15 digits); national numbers with separators or parentheses (10-12
  digits, every group but a leading `1` at least 2 digits); bare 10-11 digit runs only right after a cue
  such as "phone", "call" or "number".
- `address`: `221B Baker Street`, `10 Downing St.`, `Hauptstraße 5` (capitalised street names); lowercase
  ones only after a cue ("my address is 12 main street").
- `name`: only words of a user-supplied list (no offline NER model can be installed here: docs/PROMPTS.md).

What is *not* PII, on purpose: dates (`2024-01-15`, `15.01.2024`), order ids (`ORD-123456`), 16-digit
numbers that fail Luhn, invalid IPs (`999.1.1.1`), version numbers (`v1.2.3.4`, `version 1.2.3.4`, and any
dotted number with a part that is not a valid octet), times (`10:30:00`), ISBNs, zip codes.

The scanner errs towards recall where a false positive only costs a redacted number (a valid dotted quad
is an IP unless a version cue precedes it), and towards precision where a false positive would eat normal
prose (bare digit runs, lowercase street names, names).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chatloop.errors import UserError
from chatloop.io import read_lines

PII_TYPES = ("email", "card", "iban", "national_id", "ip", "phone", "address", "name")
"""Every type the scanner reports, in priority order: when two findings overlap, the earlier type wins."""

_PRIORITY = {kind: i for i, kind in enumerate(PII_TYPES)}


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of PII: its type and where it is (`text[start:end]`)."""

    kind: str
    start: int
    end: int


def placeholder(kind: str) -> str:
    """What redaction puts in place of PII of `kind`: `[EMAIL]`, `[PHONE]`, ... (no digit, no @)."""
    return f"[{kind.upper()}]"


# -- checksums -------------------------------------------------------------------------------------------------


def luhn_valid(number: str) -> bool:
    """The Luhn (mod 10) check of card numbers; separators are ignored."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return bool(digits) and total % 10 == 0


# Lengths of the IBAN registry (SWIFT); a country not listed here is checked against 15..34 only.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_valid(text: str) -> bool:
    """ISO 13616: letters A-Z, country code, length, and (rearranged, letters as 10..35) mod 97 == 1."""
    iban = "".join(text.split()).upper()
    if not (15 <= len(iban) <= 34 and iban[:2].isalpha() and iban[2:4].isdigit() and iban.isascii()
            and iban.isalnum()):
        return False
    if len(iban) != _IBAN_LENGTHS.get(iban[:2], len(iban)):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# -- patterns --------------------------------------------------------------------------------------------------
# Every pattern refuses to start or end inside a longer token (an identifier, a number, a dotted number), so
# that "ORD-5551234567" or "v1.2.3.4" never yield a match in their middle.

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w%+-][\w.%+-]{0,63}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-])"
)
_CARD = re.compile(
    r"(?<![\w-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -]?)\d{6}\2\d{5}|\d{13,19})"
    r"(?![\w-]|[.,]\d)"
)
_IBAN = re.compile(r"(?<!\w)[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?(?!\w)")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-]|[.,]\d)")
_NINO = re.compile(
    r"(?<!\w)(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
_VERSION_CUE = re.compile(r"(?:\bversion|\bver\.?|\brelease|\bbuild|\bfirmware|\bupdate)\s*$", re.IGNORECASE)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%\w+)?(?![\w:]|\.\d)"
)
_PHONE = re.compile(
    r"""(?<![\w+.\-/])
    (?:
        (?P<intl>(?:\+|00)[1-9]\d{0,2})                       # country code: +44, 0044
        (?:[ .\-]?\(\d{1,4}\))?                                 # +44 (0)20 ...
        (?:[ .\-]?\d{1,5}){1,6}
      |
        (?:1[ .\-])?                                            # US trunk prefix: 1-800-...
        (?:\(\d{2,5}\)[ .\-]?|\d{2,5}[ .\-])                    # area code, maybe in parentheses
        \d{2,5}(?:[ .\-]\d{2,5}){0,3}
    )
    (?![\w]|[.\-]\d)""",
    re.VERBOSE,
)
_PHONE_BARE = re.compile(r"(?<![\w+.\-/])\d{10,11}(?![\w]|[.\-]\d)")
_PHONE_CUE = re.compile(
    r"(?:phone|call|tel|mobile|cell|whatsapp|text me|sms|fax|number|reach me)\b\W{0,8}(?:\w+\W+){0,2}$",
    re.IGNORECASE,
)
# Street words, and their abbreviations (which may take a dot: "St.").
_STREET = (r"(?:street|avenue|road|boulevard|lane|drive|court|place|terrace|way|parkway|highway|square|circle"
           r"|crescent|close)\b|(?:st|ave|rd|blvd|ln|dr|ct|pl|pkwy|hwy|sq|cir)\b\.?")
_ADDRESS = re.compile(rf"(?<![\w\-.])\d{{1,5}}[A-Za-z]?,?[ \t]+(?:[A-Z][\w'.-]*[ \t]+){{1,3}}(?i:{_STREET})")
_ADDRESS_DE = re.compile(r"\b[A-ZÄÖÜ][\wäöüß-]*(?:straße|strasse|str\.|weg|gasse|allee|platz)[ \t]+\d{1,4}[a-z]?\b")
_ADDRESS_CUED = re.compile(
    rf"(?:i live at|my address is|address:|ship (?:it )?to|deliver (?:it )?to|located at)[ \t]+"
    rf"(?P<address>\d{{1,5}}[a-z]?,?[ \t]+(?:[\w'.-]+[ \t]+){{1,3}}(?:{_STREET}))",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W\d_][\w'-]*")
# Cheap gates, one scan each, so that the many prompts without PII skip the expensive patterns: every
# number-like PII has six or more digits/separators in a row (the shortest is an IPv4 like 1.2.3.4), and an
# address needs a digit next to a street word.
# Cheap gates (one fast scan each) so that the many prompts without PII skip the expensive patterns: every
# number-like PII has six or more digits and separators in a row (the shortest is an IPv4 like 1.2.3.4), an
# English address has a number before a capitalised word, a German one a street word, a cued one its cue.
_HAS_DIGIT = re.compile(r"\d")
_NUMBER_GATE = re.compile(r"\d[\d \t.()+\-]{4,}\d")
_ADDRESS_GATE = re.compile(r"\d[A-Za-z]?,?[ \t]+[A-Z]")
# Literal words (on lowercased text) that German and cued addresses need; one search for all of them.
_ADDRESS_WORDS = re.compile(r"str(?:aße|asse|\.)|weg|gasse|allee|platz|live at|address|ship|deliver|located")


def _phone_ok(match: re.Match[str]) -> bool:
    """Digit counts and grouping of a phone candidate; rejects dotted numbers (IPs, versions) and short runs."""
    text = match.group()
    digits = sum(c.isdigit() for c in text)
    groups = re.findall(r"\d+", text)
    if match.group("intl"):
        national = digits - (2 if text.startswith("00") else 0)
        return 8 <= national <= 15
    if not 10 <= digits <= 12:
        return False
    if "." in text and "-" not in text and " " not in text and len(groups) == 4:
        return False  # a dotted quad: an IP (its own detector) or a version number
    body = groups[1:] if text.startswith("1") and len(groups[0]) == 1 else groups
    return all(len(g) >= 2 for g in body)


class Scanner:
    """Finds PII in text. Without `names` it needs no data; with them, capitalised words of the list are names.

    `names` are matched whole-word and case-insensitively on capitalised words only ("Will" but not
    "will"), so a list with common words does not eat ordinary prose. A name of several words
    ("Mary Ann") matches as a sequence.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: dict[str, list[tuple[str, ...]]] = {}
        for name in names:
            words = tuple(w.casefold() for w in name.split())
            if words:
                self.names.setdefault(words[0], []).append(words)
        for options in self.names.values():
            options.sort(key=len, reverse=True)  # longest name first: "Mary Ann" before "Mary"

    @classmethod
    def from_file(cls, path: str | Path | None) -> Scanner:
        """A scanner with the names of a file (one name per line, `#` comments), or none when path is None."""
        if path is None:
            return cls()
        names = [line.strip() for _, line in read_lines(path) if line.strip() and not line.startswith("#")]
        if not names:
            raise UserError(f"{path}: no names (expected one name per line)")
        return cls(names)

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order; on overlap the higher-priority type (PII_TYPES) wins."""
        found: list[Finding] = []
        if "@" in text:
            found += [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
        digit = _HAS_DIGIT.search(text)
        if digit:  # the gates scan on from the first digit
            if _NUMBER_GATE.search(text, digit.start()):
                self._numbers(text, found)
            self._addresses(text, found, digit.start())
        if text.count(":") >= 2:
            for m in _IPV6.finditer(text):
                candidate = m.group().split("%")[0]
                if any(c.isalnum() for c in candidate) and _is_ipv6(candidate):
                    found.append(Finding("ip", m.start(), m.end()))
        if self.names:
            self._names(text, found)
        if len(found) < 2:
            return found
        kept: list[Finding] = []
        for f in sorted(found, key=lambda f: (_PRIORITY[f.kind], f.start - f.end)):
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        return sorted(kept, key=lambda f: f.start)

    def _numbers(self, text: str, found: list[Finding]) -> None:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if luhn_valid(digits) and len(set(digits)) > 1:
                found.append(Finding("card", m.start(), m.end()))
        for m in _IBAN.finditer(text):
            end = _iban_end(text, m.start(), m.end())
            if end is not None:
                found.append(Finding("iban", m.start(), end))
        found += [Finding("national_id", m.start(), m.end()) for m in _SSN.finditer(text)]
        found += [Finding("national_id", m.start(), m.end()) for m in _NINO.finditer(text)]
        for m in _IPV4.finditer(text):
            if not _VERSION_CUE.search(text, max(0, m.start() - 12), m.start()):
                found.append(Finding("ip", m.start(), m.end()))
        found += [Finding("phone", m.start(), m.end()) for m in _PHONE.finditer(text) if _phone_ok(m)]
        for m in _PHONE_BARE.finditer(text):
            if _PHONE_CUE.search(text, max(0, m.start() - 40), m.start()):
                found.append(Finding("phone", m.start(), m.end()))

    @staticmethod
    def _addresses(text: str, found: list[Finding], first_digit: int) -> None:
        if _ADDRESS_GATE.search(text, first_digit):
            found += [Finding("address", m.start(), m.end()) for m in _ADDRESS.finditer(text)]
        if _ADDRESS_WORDS.search(text.lower()):
            found += [Finding("address", m.start(), m.end()) for m in _ADDRESS_DE.finditer(text)]
            found += [Finding("address", m.start("address"), m.end("address")) for m in _ADDRESS_CUED.finditer(text)]

    def _names(self, text: str, found: list[Finding]) -> None:
        words = list(_WORD.finditer(text))
        i = 0
        while i < len(words):
            word = words[i]
            options = self.names.get(word.group().casefold()) if word.group()[0].isupper() else None
            matched = 0
            for option in options or ():
                window = words[i : i + len(option)]
                if len(window) == len(option) and all(w.group().casefold() == o for w, o in zip(window, option)):
                    gaps = (text[a.end() : b.start()] for a, b in zip(window, window[1:]))
                    if all(g.isspace() for g in gaps):
                        matched = len(option)
                        break
            if matched:
                found.append(Finding("name", word.start(), words[i + matched - 1].end()))
                i += matched
            else:
                i += 1

    def redact(self, text: str) -> tuple[str, list[Finding]]:
        """Text with every finding replaced by its placeholder, and the findings (empty: unchanged)."""
        findings = self.find(text)
        if not findings:
            return text, findings
        parts, pos = [], 0
        for f in findings:
            parts += [text[pos : f.start], placeholder(f.kind)]
            pos = f.end
        parts.append(text[pos:])
        return "".join(parts), findings


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _iban_end(text: str, start: int, end: int) -> int | None:
    """End of a valid IBAN starting at `start`: the regex may have taken a trailing word, so shorten to fit."""
    while end - start >= 15:
        if iban_valid(text[start:end]):
            return end
        end = text.rfind(" ", start, end)  # drop the last space-separated group
    return None


def scan(text: str, scanner: Scanner | None = None) -> list[Finding]:
    """Findings in `text` with the default scanner (no names) or the one given."""
    return (scanner or _DEFAULT).find(text)


_DEFAULT = Scanner()
