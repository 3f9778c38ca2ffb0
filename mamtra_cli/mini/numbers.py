"""Numbers and a few symbols → English words, for the mini voice's text normaliser (`CharTokenizer.normalize`).

The mini voice was trained on sentences without a single digit, so digits must become words before the
tokenizer sees them. `expand_numbers` handles, in this order:

- "&" → "and";
- currency with $, £ or € in front: "$5" → "five dollars", "$1" → "one dollar",
  "£3.50" → "three pounds fifty", "$0.99" → "ninety nine cents", "€2,000" → "two thousand euros",
  "-$5" → "minus five dollars", "$5 million" → "five million dollars";
- times: "10:30" → "ten thirty", "7:05" → "seven oh five", "9:00" → "nine o'clock",
  "18:00" → "eighteen hundred", with an optional am/pm: "7:30pm" → "seven thirty p m";
- ordinals: "1st" → "first", "22nd" → "twenty second", "103rd" → "one hundred third", "11th" → "eleventh";
- decades and plurals: "1990s" → "nineteen nineties", "the 80s" / "'80s" → "eighties";
- percentages: "50%" → "fifty percent", "2.5%" → "two point five percent";
- decimals: "3.14" → "three point one four", ".5" → "point five";
- signs: "-3" → "minus three", "+3" → "plus three" (only where the sign starts a word: "5-3" is left a range);
- years: a 4-digit number standing alone (no sign, separator or decimal part) from 1100 to 1999 or 2010 to
  2099 is read in pairs: "1999" → "nineteen ninety nine", "1905" → "nineteen oh five", "1900" →
  "nineteen hundred", "2024" → "twenty twenty four"; 2000-2009 read as cardinals: "two thousand five";
- cardinals from 0 to 999,999,999,999, with or without thousands separators: "1,234" → "one thousand two
  hundred thirty four" (no "and", and compounds with a space, not a hyphen: "twenty two");
- anything else made of digits (larger numbers, numbers with leading zeros such as "007") digit by digit.

Words glued to a number are split from it ("mp3" → "mp three"). Capitalisation of the rest is kept; the
words produced are lower case. Pure Python, no dependency.
"""

from __future__ import annotations

import re

__all__ = ["expand_numbers"]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
MAX_CARDINAL = 10**12 - 1
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}
# symbol → (singular, plural, singular of the hundredth, plural of the hundredth)
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents")}

# A number as written: digits with optional thousands separators ("1,234,567"); a comma not followed by
# exactly three digits is punctuation ("1,2" stays one, two).
_INT = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+"


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def _digits(s: str) -> str:
    return " ".join(_ONES[int(d)] for d in s)


def _cardinal(n: int) -> str:
    """0 ≤ n ≤ MAX_CARDINAL → words ("one thousand two hundred thirty four")."""
    if n == 0:
        return "zero"
    words = []
    for size, name in _SCALES:
        if n >= size:
            words += _below_thousand(n // size) + [name]
            n %= size
    if n:
        words += _below_thousand(n)
    return " ".join(words)


def _integer(written: str) -> str:
    """An integer as written (maybe with separators) → words; leading zeros or > MAX_CARDINAL: digit by digit."""
    digits = written.replace(",", "")
    if (len(digits) > 1 and digits[0] == "0") or int(digits) > MAX_CARDINAL:
        return _digits(digits)
    return _cardinal(int(digits))


def _ordinal(written: str) -> str:
    words = _integer(written).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join(words[:-1] + [last])


def _year(n: int) -> str:
    high, low = divmod(n, 100)
    if low == 0:
        return f"{_cardinal(high)} hundred"
    if low < 10:
        return f"{_cardinal(high)} oh {_ONES[low]}"
    return f"{_cardinal(high)} {_cardinal(low)}"


def _is_year(written: str) -> bool:
    return len(written) == 4 and (1100 <= int(written) <= 1999 or 2010 <= int(written) <= 2099)


def _decimal(whole: str | None, fraction: str) -> str:
    head = _integer(whole) + " " if whole else ""
    return f"{head}point {_digits(fraction)}"


def _sign(s: str | None) -> str:
    return {"-": "minus ", "+": "plus "}.get(s or "", "")


def _currency(m: re.Match) -> str:
    one, many, cent, cents = _CURRENCIES[m["sym"]]
    whole, frac = m["whole"], m["frac"]
    if frac is not None and len(frac) > 2 and not m["scale"]:  # "$1.234": not an amount of cents
        return f"{_sign(m['sign'])}{_decimal(whole, frac)} {many}"
    units = int(whole.replace(",", ""))
    hundredths = int(frac.ljust(2, "0")) if frac else 0
    if m["scale"]:  # "$5 million" → "five million dollars", "$2.5 billion" → "two point five billion dollars"
        amount = _decimal(whole, frac) if frac else _integer(whole)
        return f"{_sign(m['sign'])}{amount} {m['scale'].lower()} {many}"
    if units == 0 and hundredths:
        words = f"{_cardinal(hundredths)} {cent if hundredths == 1 else cents}"
    else:
        words = f"{_integer(whole)} {one if units == 1 else many}"
        if hundredths:
            words += f" {_cardinal(hundredths)}"
    return _sign(m["sign"]) + words


def _decade(m: re.Match) -> str:
    """"1990s" → "nineteen nineties", "80s" / "'80s" → "eighties", "5s" → "fives"."""
    written = m["n"]
    words = (_year(int(written)) if _is_year(written) else _integer(written)).split()
    last = words[-1]
    words[-1] = last[:-1] + "ies" if last.endswith("y") else last + "s"
    return " ".join(words)


def _time(m: re.Match) -> str:
    hour, minute = int(m["h"]), int(m["m"])
    if minute == 0:
        words = f"{_cardinal(hour)} o'clock" if 1 <= hour <= 12 else f"{_cardinal(hour)} hundred"
    elif minute < 10:
        words = f"{_cardinal(hour)} oh {_ONES[minute]}"
    else:
        words = f"{_cardinal(hour)} {_cardinal(minute)}"
    if m["ampm"]:
        words += f" {m['ampm'][0].lower()} m"
    return words


def _plain(m: re.Match) -> str:
    written = m["n"]
    if m["sign"] is None and "," not in written and _is_year(written):
        return _year(int(written))
    return _sign(m["sign"]) + _integer(written)


# A sign counts only where it starts a word (start of text, after a space or an opening bracket/quote).
_SIGN = r"(?:(?<![\w.,])(?P<sign>[-+]))?"
_RULES: list[tuple[re.Pattern, object]] = [
    (re.compile(r"&"), lambda m: "and"),
    (re.compile(_SIGN + r"(?P<sym>[$£€])\s?(?P<whole>" + _INT + r")(?:\.(?P<frac>\d+))?"
                r"(?:\s(?P<scale>(?i:thousand|million|billion|trillion))\b)?"), _currency),
    (re.compile(r"(?<![\d:.,])(?P<h>[01]?\d|2[0-4]):(?P<m>[0-5]\d)(?![\d:])"
                r"(?:\s?(?P<ampm>[aApP]\.?[mM])(?![a-zA-Z]))?"), _time),
    (re.compile(r"(?<![\d.,])(?P<n>" + _INT + r")(?:st|nd|rd|th)(?![a-zA-Z])", re.IGNORECASE),
     lambda m: _ordinal(m["n"])),
    (re.compile(r"(?<![\d.,])'?(?P<n>" + _INT + r")'?s(?![a-zA-Z])"), _decade),
    (re.compile(_SIGN + r"(?<![\d.,])(?P<n>" + _INT + r")(?:\.(?P<frac>\d+))?\s?%"),
     lambda m: _sign(m["sign"]) + (_decimal(m["n"], m["frac"]) if m["frac"] else _integer(m["n"])) + " percent"),
    (re.compile(_SIGN + r"(?<![\d.,])(?P<n>" + _INT + r")?\.(?P<frac>\d+)"),
     lambda m: _sign(m["sign"]) + _decimal(m["n"], m["frac"])),
    (re.compile(_SIGN + r"(?P<n>" + _INT + r")"), _plain),
]


def _substitute(pattern: re.Pattern, spell, text: str) -> str:
    """`pattern.sub(spell, text)`, with a space put between the words made and a letter or digit glued to them."""
    out, last = [], 0
    for m in pattern.finditer(text):
        words = spell(m)
        if m.start() > 0 and text[m.start() - 1].isalnum():
            words = " " + words
        if m.end() < len(text) and text[m.end()].isalnum():
            words += " "
        out += [text[last:m.start()], words]
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def expand_numbers(text: str) -> str:
    """`text` with every number (and "&") written out in English words; see the module docstring for the rules.

    >>> expand_numbers("On the 3rd, 50% of the $1,200 went at 10:30.")
    'On the third, fifty percent of the one thousand two hundred dollars went at ten thirty.'
    """
    for pattern, spell in _RULES:
        text = _substitute(pattern, spell, text)
    return text
