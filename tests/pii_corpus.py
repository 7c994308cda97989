"""A planted PII corpus for measuring lmlab.data.pii: sentences that each hold one instance of a PII
kind (in varied formats and contexts) or one look-alike that must survive redaction.

Shared by tests/test_data_pii.py (small, seeded) and benchmarks/pii.py (bigger, another seed).
"""

from __future__ import annotations

import base64
import json
import random
import string
from dataclasses import dataclass

KINDS = ("email", "phone", "ip", "credit_card", "iban", "secret")


@dataclass
class Unit:
    """One sentence: ``text`` before redaction, ``expected`` after it, and what it holds: a PII
    ``kind``, or None for a look-alike of category ``category``."""

    text: str
    expected: str
    kind: str | None
    category: str


CONTEXTS = [
    "Please contact {} for details.",
    "{}",
    "On 3 May she wrote: reach me at {} anytime.",
    "- {}\n",
    "| user | {} | active |",
    '{{"owner": "{}", "id": 7}}',
    "(see {}).",
    "Ticket #4411 lists {} as the reference.",
    "> forwarded: {}, thanks!",
    "Notes:\n\n    {}\n",
    "Bitte an {} senden.",
    "Le contact est {}.",
]


def luhn_digit(body: str) -> str:
    """The check digit that makes body + digit pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def iban_for(rng: random.Random, country: str, length: int) -> str:
    """A valid IBAN of ``country`` (random account part, real mod-97 check digits)."""
    bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    if country in ("GB", "IE", "NL"):  # letters for the bank code
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + bban[4:]
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(ch, 36)) for ch in moved)) % 97
    return f"{country}{check:02d}{bban}"


def _grouped(s: str, size: int = 4, sep: str = " ") -> str:
    return sep.join(s[i:i + size] for i in range(0, len(s), size))


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
NAMES = ["anna", "bob", "chen.wei", "d.okafor", "eve_m", "f.garcia", "greta", "hiro", "ivan.petrov", "jo"]
DOMAINS = ["example.com", "mail.example.org", "uni-bonn.de", "corp.co.uk", "EXAMPLE.NET", "x.io", "post.fr"]


def email(rng: random.Random) -> str:
    local = rng.choice(NAMES) + rng.choice(["", str(rng.randint(1, 99)), "+news", ".work"])
    out = f"{local}@{rng.choice(DOMAINS)}"
    return out.upper() if rng.random() < 0.1 else out


def phone(rng: random.Random) -> str:
    d = lambda n: _rand(rng, string.digits, n)  # noqa: E731
    nz = lambda n: str(rng.randint(2, 9)) + d(n - 1)  # noqa: E731  (no leading 0/1)
    return rng.choice([
        lambda: f"+1 ({nz(3)}) {nz(3)}-{d(4)}",
        lambda: f"+1-{nz(3)}-{nz(3)}-{d(4)}",
        lambda: f"+44 20 {nz(4)} {d(4)}",
        lambda: f"+44 (0)20 {nz(4)} {d(4)}",
        lambda: f"+49 30 {nz(8)}",
        lambda: f"+49 171 {nz(7)}",
        lambda: f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"+91 {nz(5)} {d(5)}",
        lambda: f"+81-3-{nz(4)}-{d(4)}",
        lambda: f"+61 2 {nz(4)} {d(4)}",
        lambda: f"+{nz(2)}{nz(9)}",
        lambda: f"({nz(3)}) {nz(3)}-{d(4)}",
        lambda: f"{nz(3)}-{nz(3)}-{d(4)}",
        lambda: f"{nz(3)}.{nz(3)}.{d(4)}",
        lambda: f"020 {nz(4)} {d(4)}",
        lambda: f"07700 {nz(6)}",
        lambda: f"030 {nz(8)}",
        lambda: f"0171/{nz(7)}",
        lambda: f"01 {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"(030) {nz(7)}",
    ])()


def ip(rng: random.Random) -> tuple[str, str]:
    """(text with an IP address, the same redacted): a port or a CIDR prefix length stays."""
    octet = lambda: str(rng.randint(0, 255))  # noqa: E731
    v4 = ".".join([str(rng.randint(1, 223))] + [octet() for _ in range(3)])
    groups = [format(rng.randint(0, 0xFFFF), "x") for _ in range(8)]
    port, prefix = f":{rng.randint(1024, 65535)}", f"/{rng.randint(8, 32)}"
    if rng.random() < 0.2:
        tail = rng.choice([port, prefix])
        return v4 + tail, "<|ip|>" + tail
    return rng.choice([
        lambda: v4,
        lambda: ":".join(groups),
        lambda: ":".join(groups[:3]) + "::" + ":".join(groups[6:]),
        lambda: "2001:db8::" + groups[0],
        lambda: "fe80::" + ":".join(groups[:4]),
        lambda: "::ffff:" + v4,
        lambda: ":".join(groups).upper(),
    ])(), "<|ip|>"


CARD_PREFIXES = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16),
                 ("65", 16), ("3530", 16), ("36", 14), ("62", 16), ("4", 19)]


def card_number(rng: random.Random, valid: bool = True) -> str:
    prefix, length = rng.choice(CARD_PREFIXES)
    body = prefix + _rand(rng, string.digits, length - len(prefix) - 1)
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    return body + check


def credit_card(rng: random.Random) -> str:
    number = card_number(rng)
    if len(number) == 15:
        parts = [number[:4], number[4:10], number[10:]]
    else:
        parts = [number[i:i + 4] for i in range(0, len(number), 4)]
    return rng.choice([" ", "-", ""]).join(parts)


IBAN_COUNTRIES = [("DE", 22), ("GB", 22), ("FR", 27), ("ES", 24), ("IT", 27), ("NL", 18), ("CH", 21), ("AT", 20),
                  ("BE", 16), ("PL", 28), ("SE", 24), ("NO", 15), ("IE", 22)]


def iban(rng: random.Random) -> str:
    value = iban_for(rng, *rng.choice(IBAN_COUNTRIES))
    return _grouped(value) if rng.random() < 0.5 else value


def _jwt(rng: random.Random) -> str:
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")  # noqa: E731
    head = part({"alg": "HS256", "typ": "JWT"})
    body = part({"sub": str(rng.randint(1, 10**6)), "name": rng.choice(NAMES), "iat": rng.randint(10**9, 2 * 10**9)})
    return f"{head}.{body}.{_rand(rng, ALNUM + '_-', 43)}"


def _pem(rng: random.Random) -> str:
    label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    lines = [_rand(rng, ALNUM + "+/", 64) for _ in range(rng.randint(2, 5))]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def _random_password(rng: random.Random) -> str:
    chars = [rng.choice(string.ascii_lowercase), rng.choice(string.ascii_uppercase), rng.choice(string.digits),
             rng.choice("!#$%^&*-_+")] + [rng.choice(ALNUM + "!#$%^&*") for _ in range(rng.randint(8, 20))]
    rng.shuffle(chars)
    return "".join(chars)


def secret(rng: random.Random) -> tuple[str, str]:
    """(the text holding a secret, the same text redacted): the generic assignments keep their name."""
    up = string.ascii_uppercase + string.digits
    kind = rng.randrange(11)
    if kind == 0:
        value = rng.choice(["AKIA", "ASIA"]) + _rand(rng, up, 16)
    elif kind == 1:
        value = rng.choice(["ghp_", "gho_", "ghs_"]) + _rand(rng, ALNUM, 36)
    elif kind == 2:
        value = "github_pat_" + _rand(rng, ALNUM, 22) + "_" + _rand(rng, ALNUM, 59)
    elif kind == 3:
        value = f"xox{rng.choice('abpr')}-{rng.randint(10**10, 10**11)}-{rng.randint(10**10, 10**11)}-" \
                + _rand(rng, ALNUM, 24)
    elif kind == 4:
        value = rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _rand(rng, ALNUM, 24)
    elif kind == 5:
        value = "AIza" + _rand(rng, ALNUM + "_-", 35)
    elif kind == 6:
        value = rng.choice(["sk-", "sk-proj-"]) + _rand(rng, ALNUM, 20) + "T3BlbkFJ" + _rand(rng, ALNUM, 20)
    elif kind == 7:
        value = _jwt(rng)
    elif kind == 8:
        value = _pem(rng)
    else:
        name = rng.choice(["password", "DB_PASSWORD", "api_key", "API_KEY", "secret", "client_secret", "apiKey",
                           "access_token", "AWS_SECRET_ACCESS_KEY"])
        value = _random_password(rng) if kind == 9 else _rand(rng, ALNUM, 32)
        form = rng.choice(["{n}={v}", "{n} = '{v}'", '"{n}": "{v}"', "{n}: {v}", "export {n}=\"{v}\""])
        return form.format(n=name, v=value), form.format(n=name, v="<|secret|>")
    return value, "<|secret|>"


MAKERS = {"email": email, "phone": phone, "ip": ip, "credit_card": credit_card, "iban": iban, "secret": secret}


def lookalikes(rng: random.Random) -> list[tuple[str, str]]:
    """(category, text) of everything that must survive: one of each look-alike, freshly drawn."""
    d = lambda n: _rand(rng, string.digits, n)  # noqa: E731
    hexs = lambda n: _rand(rng, "0123456789abcdef", n)  # noqa: E731
    y, m, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    bad_iban = list(iban_for(rng, *rng.choice(IBAN_COUNTRIES)))
    i = rng.choice([j for j in range(4, len(bad_iban)) if bad_iban[j].isdigit()])
    bad_iban[i] = str((int(bad_iban[i]) + rng.randint(1, 9)) % 10)  # one digit wrong: mod 97 always sees it
    bad_card = card_number(rng, valid=False)
    v = [rng.randint(0, 20) for _ in range(4)]
    return [
        ("version", f"version {v[0]}.{v[1]}.{v[2]}.{v[3]}"),
        ("version", f"v{v[0]}.{v[1]}.{v[2]}"),
        ("version", f"Python 3.{v[1]}.{v[2]}"),
        ("version", f"release {v[0]}.{v[1]}.{v[2]}.{v[3]}"),
        ("date", f"{y}-{m:02d}-{day:02d}"),
        ("date", f"{day:02d}/{m:02d}/{y}"),
        ("date", f"{day:02d}.{m:02d}.{y}"),
        ("date", f"{y}-{m:02d}-{day:02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"),
        ("time", f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"),
        ("time", f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"),
        ("year", f"in {y}"),
        ("year", f"{y}-{y + rng.randint(1, 9)}"),
        ("isbn", f"ISBN 978-{rng.randint(0, 9)}-{d(3)}-{d(5)}-{rng.randint(0, 9)}"),
        ("isbn", f"ISBN-10: {rng.randint(0, 9)}-{d(3)}-{d(5)}-{rng.randint(0, 9)}"),
        ("isbn", f"978{d(10)}"),
        ("order number", f"order #{d(8)}"),
        ("order number", f"ORD-{y}-{d(6)}"),
        ("order number", f"invoice {y}-{d(4)}-{d(2)}"),
        ("long id", f"user id {rng.randint(1, 9)}{d(13)}"),
        ("long id", f"{rng.randint(1, 9)}{d(11)}"),
        ("non-Luhn 16 digits", _grouped(bad_card) if rng.random() < 0.5 else bad_card),
        ("invalid IBAN", "".join(bad_iban)),
        ("hash", hexs(40)),
        ("hash", f"commit {hexs(7)}"),
        ("hash", f"sha256:{hexs(64)}"),
        ("uuid", f"{hexs(8)}-{hexs(4)}-4{hexs(3)}-a{hexs(3)}-{hexs(12)}"),
        ("math", f"{rng.randint(2, 999)} + {rng.randint(2, 999)} = {rng.randint(2, 2000)}"),
        ("math", f"x = {d(5)} * {d(3)} - {d(4)}"),
        ("math", f"2^{rng.randint(2, 60)} = {2 ** rng.randint(2, 60)}"),
        ("price", f"${rng.randint(1, 99)},{d(3)}.{d(2)}"),
        ("price", f"{rng.randint(1, 999)} {d(3)},{d(2)} EUR"),
        ("mac address", ":".join(hexs(2) for _ in range(6))),
        ("code", rng.choice(["std::vector<int> v;", "a::b::c", "password = None", "api_key = os.environ['API_KEY']",
                             "token = get_token()", "password: ********", "secret_key = settings.SECRET_KEY"])),
        ("coordinates", f"{rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}"),
        ("word", rng.choice(["sk-learn", "task-force", "@decorator", "user@localhost", "+1 vote"])),
        ("section", f"see section {v[0] + 1}.{v[1]}.{v[2]}.{v[3]}"),
    ]


def planted_corpus(seed: int, per_kind: int) -> list[Unit]:
    """``per_kind`` sentences with each PII kind and as many look-alikes, shuffled (seeded)."""
    rng = random.Random(seed)
    units = []
    for kind in KINDS:
        for _ in range(per_kind):
            context = rng.choice(CONTEXTS)
            if kind in ("secret", "ip"):
                value, redacted = MAKERS[kind](rng)
            else:
                value, redacted = MAKERS[kind](rng), f"<|{kind}|>"
            units.append(Unit(context.format(value), context.format(redacted), kind, kind))
    while sum(u.kind is None for u in units) < per_kind * len(KINDS):
        for category, text in lookalikes(rng):
            context = rng.choice(CONTEXTS)
            units.append(Unit(context.format(text), context.format(text), None, category))
    rng.shuffle(units)
    return units


def score(units: list[Unit], redact) -> dict[str, dict]:
    """Per kind: planted, found (recall: the sentence came out exactly as expected), false positives
    (a look-alike changed, or a planted sentence that got another kind's placeholder), recall and precision."""
    table = {k: {"planted": 0, "found": 0, "false_positives": 0} for k in KINDS}
    missed, wrong = [], []
    for unit in units:
        out, counts = redact(unit.text)
        if unit.kind is not None:
            table[unit.kind]["planted"] += 1
            if out == unit.expected:
                table[unit.kind]["found"] += 1
            else:
                missed.append((unit.kind, unit.text, out))
            for kind, n in counts.items():
                if kind != unit.kind:
                    table[kind]["false_positives"] += n
        elif out != unit.text:
            wrong.append((unit.category, unit.text, out))
            for kind, n in counts.items():
                table[kind]["false_positives"] += n
    total = {"planted": 0, "found": 0, "false_positives": 0}
    for row in table.values():
        for key in total:
            total[key] += row[key]
    table["all"] = total
    for row in table.values():
        row["recall"] = row["found"] / row["planted"] if row["planted"] else 1.0
        row["precision"] = row["found"] / (row["found"] + row["false_positives"]) if row["found"] else 0.0
    table["_missed"], table["_wrong"] = missed, wrong
    return table
