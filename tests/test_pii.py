"""PII detection: every type with its formats, the checksums, and the near-misses that must stay untouched."""

from __future__ import annotations

import pytest

from chatloop.data.pii import Scanner, iban_valid, luhn_valid, placeholder, scan
from chatloop.errors import UserError


def found(text: str, scanner: Scanner | None = None) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start : f.end]) for f in scan(text, scanner)]


def only(text: str, kind: str, value: str) -> None:
    assert found(text) == [(kind, value)], found(text)


@pytest.mark.parametrize("email", [
    "john.doe@example.com",
    "john.doe+newsletter@example.com",  # +tag
    "a_b-c%d@mail.eu.example.co.uk",  # subdomains
    "First.Last@Example.ORG",
    "josé.müller@exämple.de",  # Unicode letters
    "x@y.io",
])
def test_email_formats(email: str) -> None:
    only(f"Write to me at {email}, thanks.", "email", email)


@pytest.mark.parametrize("text", ["user@localhost", "follow @chatloop on the web", "a@b", "price: 5 @ 3.99"])
def test_email_near_misses(text: str) -> None:
    assert found(text) == []


@pytest.mark.parametrize("phone", [
    "555-123-4567", "(555) 123-4567", "555.123.4567", "555 123 4567", "1-800-555-0199",
    "+1 555 123 4567", "+1 (555) 123-4567", "+1-555-123-4567", "+15551234567",
    "+44 20 7946 0958", "+44 (0)20 7946 0958", "0044 20 7946 0958", "020 7946 0958",
    "+33 6 12 34 56 78", "06 12 34 56 78", "+49 30 123456", "+49.30.1234567",
])
def test_phone_formats(phone: str) -> None:
    only(f"You can call me at {phone} tonight.", "phone", phone)


def test_bare_digit_run_is_a_phone_only_after_a_cue() -> None:
    only("my phone number is 5551234567", "phone", "5551234567")
    only("Call 5551234567 after six", "phone", "5551234567")
    assert found("invoice 5551234567 is paid") == []
    assert found("the unix time 1705312800 means") == []


@pytest.mark.parametrize("text", [
    "The meeting is on 2024-01-15 at 10:30.", "It happened on 15.01.2024 and 01/15/2024.",
    "My order ORD-123456 is late", "Order ORD-5551234567 is late", "ticket #1234567",
    "Update to version 10.0.19041.1234", "ISBN 978-3-16-148410-0", "zip code 12345-6789",
    "Add 1 2 3 4 5 6 7 8 9 10", "It costs 1,234,567.89 dollars", "from 1990-2000",
    "Write 4 sentences about the 3 red foxes.", "pi is 3.14159265358979",
])
def test_numbers_that_are_not_pii(text: str) -> None:
    assert found(text) == []


@pytest.mark.parametrize("card", [
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004",
    "3782 822463 10005",  # American Express 4-6-5
    "6011000990139424",
])
def test_cards_that_pass_luhn(card: str) -> None:
    assert luhn_valid(card)
    only(f"My card number is {card}.", "card", card)


@pytest.mark.parametrize("number", ["1234 5678 9012 3456", "4111-1111-1111-1112", "4111111111111112",
                                    "0000 0000 0000 0000", "4111 1111-1111 1111"])
def test_sixteen_digits_that_are_not_a_card(number: str) -> None:
    """Failing Luhn (or all zeros, or mixed separators): not a card, and not a phone or anything else either."""
    assert found(f"reference {number} please") == []


@pytest.mark.parametrize("iban", ["DE89 3704 0044 0532 0130 00", "DE89370400440532013000",
                                  "GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432",
                                  "FR14 2004 1010 0505 0001 3M02 606", "NL91ABNA0417164300", "gb82west12345698765432"])
def test_iban_formats(iban: str) -> None:
    assert iban_valid(iban)
    only(f"Pay to {iban} today", "iban", iban)


def test_iban_with_wrong_check_digits_or_length_is_not_pii() -> None:
    assert not iban_valid("DE89 3704 0044 0532 0130 01")
    assert not iban_valid("DE89 3704 0044 0532 0130")  # Germany: 22 characters
    assert found("Pay to DE89 3704 0044 0532 0130 01 today") == []


def test_iban_followed_by_a_word_in_capitals() -> None:
    only("IBAN GB82 WEST 1234 5698 7654 32 THANKS", "iban", "GB82 WEST 1234 5698 7654 32")


@pytest.mark.parametrize("ip", ["192.168.0.1", "8.8.8.8", "255.255.255.255", "1.2.3.4", "2001:db8::1",
                                "fe80::1%eth0", "::ffff:10.0.0.1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"])
def test_ip_addresses(ip: str) -> None:
    only(f"My server is {ip}.", "ip", ip)


@pytest.mark.parametrize("text", ["999.1.1.1", "1.2.3.256", "01.02.03.04", "version 1.2.3.4", "v1.2.3.4",
                                  "release 2.0.0.1", "1.2.3", "10:30:00", "std::vector", "a.b.c.d"])
def test_ip_near_misses(text: str) -> None:
    """Decision: a valid dotted quad is an IP unless a version cue precedes it (docs/PROMPTS.md)."""
    assert found(f"see {text} now") == []


@pytest.mark.parametrize("text,value", [("SSN 123-45-6789.", "123-45-6789"), ("SSN 123 45 6789", "123 45 6789"),
                                        ("NI number AB 12 34 56 C", "AB 12 34 56 C"),
                                        ("NI number AB123456C", "AB123456C")])
def test_national_ids(text: str, value: str) -> None:
    only(text, "national_id", value)


@pytest.mark.parametrize("text", ["SSN 000-12-3456", "SSN 666-12-3456", "SSN 900-12-3456", "SSN 123-00-4567",
                                  "SSN 123-45-0000", "SSN 123-45 6789", "NI number GB 12 34 56 C"])
def test_national_id_near_misses(text: str) -> None:
    assert found(text) == []


@pytest.mark.parametrize("text,value", [
    ("I live at 221B Baker Street, London.", "221B Baker Street"),
    ("Send it to 10 Downing St. please", "10 Downing St."),
    ("Our office: 1600 Pennsylvania Avenue NW", "1600 Pennsylvania Avenue"),
    ("Ich wohne in der Hauptstraße 5 in Berlin", "Hauptstraße 5"),
    ("my address is 12 main street", "12 main street"),
])
def test_street_addresses(text: str, value: str) -> None:
    only(text, "address", value)


@pytest.mark.parametrize("text", ["I have 3 dogs in the street", "Write 4 sentences about Main Street",
                                  "Route 66 is a road", "List 3 Ideas for a party"])
def test_address_near_misses(text: str) -> None:
    assert found(text) == []


def test_names_only_from_a_list_and_only_capitalised() -> None:
    scanner = Scanner(["Mary Ann", "Mary", "Will", "Oskar"])
    text = "Mary Ann met Mary and Will; they will go. OSKAR came, mary did not."
    assert found(text, scanner) == [("name", "Mary Ann"), ("name", "Mary"), ("name", "Will"), ("name", "OSKAR")]
    assert found(text) == []  # the default scanner knows no names


def test_names_file(tmp_path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# people\nBosan Bula\n\nTonric\n", encoding="utf-8")
    scanner = Scanner.from_file(path)
    assert found("I am Bosan Bula, friend of Tonric.", scanner) == [("name", "Bosan Bula"), ("name", "Tonric")]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.txt: no names"):
        Scanner.from_file(empty)


def test_redaction_replaces_every_finding_and_leaves_no_pii() -> None:
    text = ("I am Ann (ann+x@mail.example.com, +1 (555) 123-4567), card 4111 1111 1111 1111, "
            "IBAN DE89 3704 0044 0532 0130 00, IP 10.0.0.1, SSN 123-45-6789, at 221B Baker Street.")
    redacted, findings = Scanner(["Ann"]).redact(text)
    assert sorted({f.kind for f in findings}) == ["address", "card", "email", "iban", "ip", "name",
                                                  "national_id", "phone"]
    assert redacted == ("I am [NAME] ([EMAIL], [PHONE]), card [CARD], IBAN [IBAN], IP [IP], SSN [NATIONAL_ID], "
                        "at [ADDRESS].")
    assert scan(redacted, Scanner(["Ann"])) == []
    assert placeholder("email") == "[EMAIL]"


def test_overlaps_keep_the_higher_priority_type() -> None:
    # 16 digits that pass Luhn, grouped like a phone would never be: the card wins, nothing else reported
    assert found("call 4111 1111 1111 1111") == [("card", "4111 1111 1111 1111")]
    # the dotted quad inside an IPv4-mapped IPv6 address is reported once, as the whole address
    assert found("::ffff:192.168.1.1") == [("ip", "::ffff:192.168.1.1")]


def test_text_without_pii_is_returned_unchanged() -> None:
    text = "Describe the blue glimmok in 4 sentences."
    assert Scanner().redact(text) == (text, [])
