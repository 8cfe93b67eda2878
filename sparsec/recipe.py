"""TOML recipes ⇄ ordered lists of configured passes.

```toml
version = 1
[[pass]]
name = "sparse-finetune"
method = "delta"
density = 0.01
```

Every problem gets a one-line `RecipeError` naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from ._util import read_regular_file
from .errors import BadInputError, OptionError, RecipeError
from .passes.base import Pass, get_pass

__all__ = ["RECIPE_VERSION", "resolve_passes", "load_recipe", "parse_recipe", "parse_pass_arg", "dump_recipe",
           "make_pass"]

RECIPE_VERSION = 1
_TOP_LEVEL = {"version", "pass", "description"}
_MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; this bounds a wrong path


def load_recipe(path: str | Path) -> list[Pass]:
    p = Path(path)
    try:
        data = read_regular_file(p, "recipe file", _MAX_RECIPE_BYTES)
    except BadInputError as e:
        raise RecipeError(str(e)) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e})") from None
    return parse_recipe(text, where=p.name)


def parse_recipe(text: str, where: str = "recipe") -> list[Pass]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: TOML syntax error: {e}") from None
    except RecursionError:
        raise RecipeError(f"{where}: arrays or tables nested too deeply to be a recipe; a "
                          "recipe has `version` and flat [[pass]] tables") from None
    lines = _key_lines(text)
    for key in data:
        if key not in _TOP_LEVEL:
            raise RecipeError(f"{where}:{lines.get((None, key), '?')}: unknown top-level key "
                              f"'{key}'; a recipe has `version` and `[[pass]]` tables")
    version = data.get("version", RECIPE_VERSION)
    if type(version) is not int or version != RECIPE_VERSION:
        raise RecipeError(f"{where}: recipe version {version!r} is not supported; this sparsec "
                          f"reads version {RECIPE_VERSION}")
    entries = data.get("pass", [])
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: `pass` must be an array of tables: write [[pass]]")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise RecipeError(f"{where}: `pass` entry #{i + 1} is {e!r:.40}, not a table; write "
                              "each pass as a [[pass]] table with name = \"...\"")
    if not isinstance(data.get("description", ""), str):
        raise RecipeError(f"{where}: `description` must be a string")
    return [_entry_to_pass(e, i, lines, where) for i, e in enumerate(entries)]


def _entry_to_pass(entry: dict[str, Any], index: int, lines: dict, where: str) -> Pass:
    head = lines.get((index, None), "?")
    if "name" not in entry:
        raise RecipeError(f"{where}:{head}: [[pass]] #{index + 1} has no `name`")
    name = entry["name"]
    loc = f"{where}:{lines.get((index, 'name'), head)}"
    if not isinstance(name, str):
        raise RecipeError(f"{loc}: pass name must be a string, got {name!r}")
    options = {k: v for k, v in entry.items() if k != "name"}
    try:
        cls = get_pass(name)
    except RecipeError as e:
        raise RecipeError(f"{loc}: {e}") from None
    return make_pass(cls, options, lambda key: f"{where}:{lines.get((index, key), head)}")


def make_pass(cls: type[Pass], options: dict[str, Any], locate=lambda key: "") -> Pass:
    """Instantiate `cls` with `options`, turning every problem into a located RecipeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise OptionError(f"{_prefix(locate(key))}pass '{cls.name}' has no option '{key}'; "
                              f"{hint}(`sparsec explain {cls.name}` lists them)")
    try:
        return cls(**options)
    except OptionError as e:
        key = _option_in(str(e), options)
        raise OptionError(f"{_prefix(locate(key))}{e}") from None
    except (TypeError, ValueError) as e:
        raise OptionError(f"{_prefix(locate(None))}pass '{cls.name}': {e}") from None


def _prefix(loc: str) -> str:
    return f"{loc}: " if loc else ""


def _option_in(message: str, options: dict[str, Any]) -> str | None:
    m = re.search(r"option '[^.']+\.([^']+)'", message)
    return m[1] if m and m[1] in options else None


def _key_lines(text: str) -> dict[tuple[int | None, str | None], int]:
    """Line numbers of `[[pass]]` headers and of keys, by (pass index, key)."""
    out: dict[tuple[int | None, str | None], int] = {}
    index: int | None = None
    in_other_table = False
    for no, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s.startswith("[[pass]]"):
            index = 0 if index is None else index + 1
            in_other_table = False
            out[(index, None)] = no
        elif s.startswith("["):
            in_other_table = True
        else:
            m = re.match(r'["\']?([A-Za-z0-9_\-]+)["\']?\s*=', s)
            if m and not in_other_table:
                out.setdefault((index, m[1]), no)
    return out


# --pass NAME[:k=v,...] ----------------------------------------------------------------------
def parse_pass_arg(arg: str) -> Pass:
    """Parse a CLI `--pass NAME[:k=v,k=v]`; values are TOML literals, bare words are strings."""
    name, _, rest = arg.partition(":")
    name = name.strip()
    if not name:
        raise RecipeError(f"--pass {arg!r}: give a pass name, e.g. --pass dead-code")
    try:
        cls = get_pass(name)
    except RecipeError as e:
        raise RecipeError(f"--pass {arg!r}: {e}") from None
    options = {}
    for item in _split_top(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--pass {arg!r}: option {item!r} is not key=value")
        try:
            options[key.strip()] = _parse_value(value.strip())
        except RecursionError:
            raise RecipeError(f"--pass {name}: option {key.strip()!r} is nested too deeply; "
                              "give a flat list") from None
    return make_pass(cls, options, lambda key: f"--pass {name}")


def _split_top(text: str) -> list[str]:
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in (s.strip() for s in parts) if p]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    except RecursionError:
        raise RecipeError(f"--pass value {text[:20]!r}…: nested too deeply; give a flat "
                          "list") from None
    if text.startswith("[") and text.endswith("]"):
        return [_parse_value(x) for x in _split_top(text[1:-1])]
    return text


def dump_recipe(passes: Sequence[Pass]) -> str:
    """A recipe that `parse_recipe` reads back into equal passes."""
    entries = []
    for p in passes:
        entry: dict[str, Any] = {"name": p.name}
        for k, v in p.options().items():
            if v is None:
                continue
            entry[k] = list(v) if isinstance(v, tuple) else v
        entries.append(entry)
    import tomli_w  # only writing needs it

    return tomli_w.dumps({"version": RECIPE_VERSION, "pass": entries})


def resolve_passes(recipe: str | Path | None, passes: Sequence[Pass | str]) -> list[Pass]:
    """The recipe's passes followed by `passes` (Pass objects or `NAME[:k=v,...]` strings)."""
    out = load_recipe(recipe) if recipe is not None else []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(parse_pass_arg(p))
        else:
            raise RecipeError(f"passes must be Pass objects or 'name:k=v' strings, got {p!r}")
    return out
