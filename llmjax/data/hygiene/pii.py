"""Personal data and secrets replaced by typed placeholders: `<EMAIL>`, `<PHONE>`,
`<IP_ADDRESS>`, `<CREDIT_CARD>`, `<GOV_ID>`, `<SECRET>`.

Every pattern is anchored so that it does not fire inside a longer number or word, and the
number-like ones are validated after matching (Luhn for cards, the reserved SSN areas, Python's
`ipaddress` for IPs), because a corpus of code and prose is full of version numbers, dates,
hashes and constants that a bare regex would take for PII. What a placeholder costs a false
positive is a damaged training example; what a miss costs is a leaked address or key, so the
secret patterns are the broad ones and the number patterns the narrow ones.

Order matters: secrets first (a URL's `user:pass@host` would otherwise read as an e-mail), then
e-mails, cards, ID numbers, phones and IPs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS = {
    "EMAIL": "<EMAIL>",
    "PHONE": "<PHONE>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "GOV_ID": "<GOV_ID>",
    "SECRET": "<SECRET>",
}
TYPES = tuple(PLACEHOLDERS)
CONTEXT_CHARS = 40  # characters either side of a placeholder in a report example

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
    r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", re.S)
# Credentials in a URL: scheme://user:password@host keeps scheme, user and host (the pattern
# starts at the literal "://", which `re` finds fast).
_URL_PASSWORD = re.compile(r"(://[^\s:@/]+:)([^\s@/]+)(@)")
_TOKENS = re.compile(
    r"(?=[AgxS])\b(?:"
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|sk_live_[A-Za-z0-9]{16,}"  # Stripe secret keys
    r")\b")
# `api_key = "..."`, `password: ...`, `token=...`: the value goes, the name stays. A quoted value
# of 8+ characters counts; an unquoted one must be 12+ characters mixing letters and digits and not
# a call, so that `token = self.next_token()` and `password = getpass()` stay.
_ASSIGNED = re.compile(
    r"(?i)(?=[acgpst])\b((?:api[_-]?key|apikey|api[_-]?secret|secret[_-]?key|access[_-]?key"
    r"|client[_-]?secret|access[_-]?token|auth[_-]?token|token|secret|password|passwd|pwd)"
    r"[\"']?\s*(?<![=!<>])[:=](?!=)\s*)"
    r"(?:([\"'])([^\s\"']{8,})\2|([A-Za-z0-9_/+.=-]{12,})(?![\w(]))")
_EMAIL = re.compile(r"(?=[\w.%+-])(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+"
                    r"[A-Za-z]{2,24}\b(?![.@]\w)")
# 13-19 digits, optionally in groups separated by one space or hyphen; Luhn and an issuer prefix
# decide (see `_is_card`).
_CARD = re.compile(r"(?=\d)(?<![\w.+-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
# US Social Security numbers ddd-dd-dddd (area 000, 666 and 900-999, group 00 and serial 0000
# are never issued); UK National Insurance numbers (two prefix letters from the allowed set, six
# digits, a suffix A-D; the prefixes BG, GB, KN, NK, NT, TN, ZZ are never issued).
_SSN = re.compile(
    r"(?=\d)(?<![\w.-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-]|\.\d)")
_NINO = re.compile(
    r"(?=[A-Z])\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# Phones need separators: NANP (555) 123-4567 / 555-123-4567 / +1 555 123 4567, or international
# with a leading + and 8-15 digits. Dates (4-2-2), versions and bare numbers do not fit.
_PHONE = re.compile(
    r"(?=[+(\d])(?<![\w.+-])(?:"
    r"(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
    r"|\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,5}"
    r")(?![\w-]|\.\d)")
_IPV4 = re.compile(
    r"(?=\d)(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?=[0-9A-Fa-f:])(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                   r"(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# Dotted quads that are versions or section numbers: "v1.2.3.4", `__version__ = "0.5.1.2"`,
# 'section 8.1.2.2', '#section-7.1.1.1'.
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|version_*|sections?|release|§)\W{0,4}$")
# Documentation ranges (RFC 5737, RFC 3849) are examples by definition.
_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", match.group())
    if not 13 <= len(digits) <= 19 or not _luhn(digits):
        return False
    # Issuer prefixes (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro): a Luhn
    # check alone passes one random number in ten.
    two, four = int(digits[:2]), int(digits[:4])
    return (digits[0] == "4" or 51 <= two <= 55 or 2221 <= four <= 2720 or two in (34, 37)
            or digits.startswith(("6011", "65", "35", "36", "38", "30", "62", "50", "56", "57",
                                  "58", "63", "67")))


def _is_assigned_secret(match: re.Match) -> bool:
    value = match.group(4)
    if value is None:  # a quoted value
        return True
    # Unquoted: a random-looking value mixes letters and digits and is no attribute path.
    return (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
            and not re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value))


def _is_phone(match: re.Match) -> bool:
    return 10 <= sum(c.isdigit() for c in match.group()) <= 15 or (
        match.group().startswith("+") and sum(c.isdigit() for c in match.group()) >= 8)


def _is_host_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    # Loopback, unspecified, multicast and reserved addresses (netmasks like 255.255.255.0 fall in
    # 240/4; for IPv6, `::2` or `1::2`, which are slices in code, fall in ::/8), documentation
    # examples, network addresses (x.x.x.0, x::) and 0.x.x.x (masks) identify nobody.
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return False
    if any(ip in net for net in _DOCUMENTATION if net.version == ip.version):
        return False
    return not text.endswith((".0", "::")) and not text.startswith("0.")


def _is_ip(match: re.Match) -> bool:
    before = match.string[max(0, match.start() - 16):match.start()]
    if _VERSION_BEFORE.search(before):
        return False
    return _is_host_ip(match.group())


# (type, pattern, keep(match) -> bool, group to replace (0: the whole match; -1: the value group
# that matched, quoted or not), a substring without which the pattern cannot match ('' = none)).
# Every pattern starts with a lookahead for its first character, which lets `re` skip ahead to
# candidate positions: three times faster on code.
_Rule = tuple[str, re.Pattern, Callable[[re.Match], bool] | None, int, str]
_RULES: tuple[_Rule, ...] = (
    ("SECRET", _PRIVATE_KEY, None, 0, "PRIVATE KEY"),
    ("SECRET", _URL_PASSWORD, None, 2, "://"),
    ("SECRET", _TOKENS, None, 0, ""),
    ("SECRET", _ASSIGNED, _is_assigned_secret, -1, ""),
    ("EMAIL", _EMAIL, None, 0, "@"),
    ("CREDIT_CARD", _CARD, _is_card, 0, ""),
    ("GOV_ID", _SSN, None, 0, "-"),
    ("GOV_ID", _NINO, None, 0, ""),
    ("PHONE", _PHONE, _is_phone, 0, ""),
    ("IP_ADDRESS", _IPV4, _is_ip, 0, "."),
    ("IP_ADDRESS", _IPV6, _is_ip, 0, ":"),
)


def scrub(text: str) -> tuple[str, dict[str, int], list[tuple[str, str]]]:
    """(text with every PII found replaced, count per type, up to 3 (type, example) per type).

    An example is the scrubbed text around one placeholder, so it shows what was found where
    without the value itself.
    """
    counts: dict[str, int] = {}
    for kind, pattern, keep, group, needed in _RULES:
        if needed not in text:
            continue
        placeholder = PLACEHOLDERS[kind]

        def replace(m: re.Match, keep=keep, group=group, placeholder=placeholder, kind=kind) -> str:
            if keep is not None and not keep(m):
                return m.group()
            counts[kind] = counts.get(kind, 0) + 1
            g = group if group >= 0 else (3 if m.group(3) is not None else 4)
            if g == 0:
                return placeholder
            start, end = m.start(g) - m.start(), m.end(g) - m.start()
            return m.group()[:start] + placeholder + m.group()[end:]

        text = pattern.sub(replace, text)
    return text, counts, examples(text, counts) if counts else []


def examples(scrubbed: str, counts: dict[str, int], per_type: int = 3) -> list[tuple[str, str]]:
    """Up to `per_type` (type, context) pairs: CONTEXT_CHARS either side of each placeholder."""
    out = []
    for kind in counts:
        placeholder = PLACEHOLDERS[kind]
        start = 0
        for _ in range(per_type):
            at = scrubbed.find(placeholder, start)
            if at < 0:
                break
            lo, hi = max(0, at - CONTEXT_CHARS), at + len(placeholder) + CONTEXT_CHARS
            out.append((kind, " ".join(scrubbed[lo:hi].split())))
            start = at + len(placeholder)
    return out
