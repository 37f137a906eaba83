"""Safe HTML building blocks for the report.

Every string that reaches the page passes through :func:`esc` (``html.escape`` with
``quote=True``) unless it is a :class:`Markup` — a ``str`` subclass made only by this module's
builders, by :func:`raw` for the package's own SVG/CSS, or by escaping. Model-provided text (model
and corpus names, token strings, words, commands, setting values) is therefore escaped by
construction: building an element from a plain ``str`` cannot inject markup.
"""
from __future__ import annotations

import html
import json
import math
import re
from typing import Any, Iterable, Mapping, Optional

# C0/C1 control characters other than tab, newline and carriage return are not allowed in HTML
# text; they are shown as their U+24xx "control picture" or dropped.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                  "source", "track", "wbr"})
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]*$")


class Markup(str):
    """A string that is already safe HTML (escaped text or markup built here)."""

    __slots__ = ()

    def __add__(self, other: Any) -> "Markup":
        return Markup(str.__add__(self, esc(other)))


def _visible_control(match: re.Match) -> str:
    code = ord(match.group(0))
    return chr(0x2400 + code) if code < 0x20 else "\N{REPLACEMENT CHARACTER}"


def esc(value: Any) -> Markup:
    """Escape ``value`` (converted with ``str``) for HTML text or a quoted attribute value.

    ``Markup`` passes through unchanged; ``None`` becomes the empty string.
    """
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    text = _CONTROL.sub(_visible_control, str(value))
    return Markup(html.escape(text, quote=True))


def raw(text: str) -> Markup:
    """Mark trusted text (the package's own CSS, sanitised SVG) as markup."""
    return Markup(text)


def join(parts: Iterable[Any], sep: Any = "") -> Markup:
    """Escape and join ``parts`` (``None`` entries skipped)."""
    return Markup(esc(sep).join(esc(p) for p in _flatten(parts)))


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    for item in items:
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def el(tag: str, *children: Any, **attrs: Any) -> Markup:
    """``<tag attrs>children</tag>``; children and attribute values are escaped unless Markup.

    Attribute names: a trailing underscore is dropped (``class_``), other underscores become
    hyphens (``aria_label``). ``True`` gives a bare attribute; ``None``/``False`` leaves it out.
    """
    if not _NAME.match(tag):
        raise ValueError(f"bad tag name {tag!r}")
    parts = [f"<{tag}"]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key[:-1] if key.endswith("_") else key.replace("_", "-")
        if not _NAME.match(name):
            raise ValueError(f"bad attribute name {name!r}")
        parts.append(f" {name}" if value is True else f' {name}="{esc(value)}"')
    parts.append(">")
    if tag in VOID:
        if children:
            raise ValueError(f"<{tag}> takes no children")
        return Markup("".join(parts))
    parts.extend(esc(c) for c in _flatten(children))
    parts.append(f"</{tag}>")
    return Markup("".join(parts))


# --------------------------------------------------------------------------- number formatting
DASH = "\N{EM DASH}"
MINUS = "\N{MINUS SIGN}"


def finite(x: Any) -> bool:
    """True for a real, finite number (bools excluded)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def superscript(n: int) -> str:
    """An integer in Unicode superscript digits: −4 → ⁻⁴."""
    return str(int(n)).translate(_SUPERSCRIPT)


def num(x: Any, sig: int = 3) -> str:
    """``x`` to ``sig`` significant digits, Unicode minus, thousands separators for big values;
    an em dash for ``None``/NaN/inf."""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}".replace("-", MINUS)
    if not finite(x):
        return DASH
    x = float(x)
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 1e6 or mag < 1e-3:
        text = f"{x:.{sig - 1}e}"
        mant, exp = text.split("e")
        text = f"{mant}×10{superscript(int(exp))}"
    elif mag >= 1000:
        text = f"{x:,.0f}"
    else:
        decimals = max(sig - 1 - int(math.floor(math.log10(mag))), 0)
        text = f"{x:.{decimals}f}"
    return text.replace("-", MINUS)


def pm(mean: Any, std: Any, sig: int = 2) -> str:
    """``mean ± std``, both to the decimals that ``std`` warrants (``sig`` significant digits of
    the larger of the two when ``std`` is zero or missing)."""
    if not finite(mean):
        return DASH
    if not finite(std) or std <= 0:
        return num(mean, sig + 1)
    decimals = max(sig - 1 - int(math.floor(math.log10(abs(std)))), 0)
    decimals = min(decimals, 8)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}".replace("-", MINUS)


def interval(mean: Any, low: Any, high: Any, sig: int = 2, *, signed: bool = False) -> str:
    """``mean [low, high]``, all three to the decimals that the interval's half-width warrants
    (``sig`` significant digits of it); ``signed`` writes a plus sign on positive numbers (for
    differences). Only the mean when the interval is missing or empty."""
    if not finite(mean):
        return DASH
    plus = "+" if signed else ""
    if not (finite(low) and finite(high)) or high <= low:
        text = num(mean, sig + 1)
        return ("+" + text) if signed and mean > 0 else text
    half = (high - low) / 2.0
    decimals = min(max(sig - 1 - int(math.floor(math.log10(half))), 0), 8)
    return (f"{mean:{plus}.{decimals}f} [{low:{plus}.{decimals}f}, {high:{plus}.{decimals}f}]"
            .replace("-", MINUS))


def share(value: Any, low: Any = None, high: Any = None) -> str:
    """A share as whole percent, with its interval when given: ``15 % [10 %, 20 %]``."""
    if not finite(value):
        return DASH
    text = f"{100 * value:.0f} %"
    if finite(low) and finite(high):
        text += f" [{100 * low:.0f} %, {100 * high:.0f} %]"
    return text


def pvalue(p: Any) -> str:
    """A p-value: ``0.032``, ``1.2×10⁻⁵``, or ``< 10⁻³⁰⁰`` where it underflowed to zero."""
    if not finite(p):
        return DASH
    if p <= 0:
        return f"< 10{superscript(-300)}"
    return num(p, 2)


def seconds(x: Any) -> str:
    """A duration in seconds as ``0.41 s``, ``12.3 s``, ``4 min 05 s`` or ``1 h 02 min``."""
    if not finite(x):
        return DASH
    x = float(x)
    if x < 60:
        return f"{x:.3g} s"
    if x < 3600:
        m, s = divmod(int(round(x)), 60)
        return f"{m} min {s:02d} s"
    h, rem = divmod(int(round(x)), 3600)
    return f"{h} h {rem // 60:02d} min"


def value_text(value: Any) -> str:
    """A setting or plan value as one line of text (numbers formatted, containers as JSON)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    try:
        return json.dumps(value, ensure_ascii=False, default=str, sort_keys=False)
    except (TypeError, ValueError):
        return str(value)


def table(header: Optional[list[Any]], rows: Iterable[Iterable[Any]], *, cls: str = "data",
          caption: Any = None, numeric: Optional[set[int]] = None) -> Markup:
    """A table in a horizontally scrolling wrapper; ``numeric`` column indexes align right."""
    numeric = numeric or set()
    head = None
    if header:
        head = el("thead", el("tr", [el("th", h, scope="col",
                                        class_="num" if i in numeric else None)
                                     for i, h in enumerate(header)]))
    body = el("tbody", [el("tr", [el("td", c, class_="num" if i in numeric else None)
                                  for i, c in enumerate(row)]) for row in rows])
    cap = el("caption", caption) if caption is not None else None
    return el("div", el("table", cap, head, body, class_=cls), class_="table-wrap")


def kv_table(items: Mapping[str, Any] | Iterable[tuple[Any, Any]], *, caption: Any = None) -> Markup:
    """A two-column key/value table."""
    pairs = items.items() if isinstance(items, Mapping) else items
    body = el("tbody", [el("tr", el("th", k, scope="row"), el("td", v)) for k, v in pairs])
    cap = el("caption", caption) if caption is not None else None
    return el("div", el("table", cap, body, class_="kv"), class_="table-wrap")
