"""What the recipe loader checks before any stage runs: safe YAML, names, `--set`, quirks, paths.

- YAML: anchors and aliases (`&a`, `*a`, `<<: *a`) are refused, so an alias bomb cannot expand;
  a key given twice in one mapping is refused (YAML would keep the last one silently).
- Names: a recipe name (file stem and `name:`) is letters, digits, `.`, `_`, `-`, starting with a
  letter or digit: it can never hold a `/`, a `..`, a space or a shell character.
- `--set SECTION.KEY=VALUE`: spaces around `=` are allowed; a key without a section names the
  sections that have it; a quirk that the recipe does not define is named with the known ones.
- Quirks: a quirk's `when_fixed` may not set what decides which code runs or which host is
  contacted (`SENSITIVE`, and URLs on a host the recipe itself does not use). Values given on the
  command line win over `when_fixed`.
- Paths: `inside(path, root)` refuses an output path that resolves outside the checkout.

Every refusal is a `RecipeError` of one line that names the file, the line and the dotted key.
"""
from __future__ import annotations

import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names file, line and key."""


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Settings that decide which code runs or which host is contacted: the recipe's own sections or
# the command line only, never a quirk's `when_fixed`.
SENSITIVE = ("model.trust_remote_code", "model.allow_pickle", "model.source", "model.name", "model.revision",
             "data.source", "data.hub_dataset", "eval.judge_base_url", "eval.benchmark_tasks_dir")
# Turning one of these on runs code from the model's files; the loader says so on stderr.
CODE_SWITCHES = {
    "trust_remote_code": "the model's own Python files (auto_map in config.json / tokenizer_config.json)",
    "allow_pickle": "pickle weight files, which execute code chosen by their author when unpickled",
}


def check_name(name: object, where: str) -> str:
    """Refuse a recipe name that could escape a folder or reach a shell."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RecipeError(f"{where}: recipe name {name!r} is not allowed: use letters, digits, '.', '_', '-' "
                          "(starting with a letter or digit; no '/', no '..', no spaces or shell characters)")
    return name


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved; refuse it when it leaves `root` (a symlink or `..` pointing elsewhere)."""
    real, top = Path(path).resolve(), Path(root).resolve()
    if not real.is_relative_to(top):
        raise RecipeError(f"{what}: {path} resolves to {real}, outside {top}; refusing to write there")
    return real


# --- YAML ----------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases before composing them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise _Refused(event.start_mark.line + 1, f"YAML {kind} '{event.anchor}' is not accepted "
                                                      "(write the value out; anchors and aliases are refused)")
        return super().compose_node(parent, index)


class _Refused(Exception):
    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line, self.msg = line, msg


def _walk(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    """Map every dotted key to its 1-based line; refuse a key repeated in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            line = k.start_mark.line + 1
            if str(k.value) in seen:
                raise _Refused(line, f"{key}: duplicate key (first at line {seen[str(k.value)]}); "
                                     "YAML would silently keep only the last one")
            seen[str(k.value)] = line
            out[key] = line
            _walk(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, f"{prefix}.{i}", out)


def load_yaml(text: str, where: str) -> tuple[Any, dict[str, int]]:
    """(data, dotted key -> line) of a YAML document, strictly; raise RecipeError naming the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is not None:
            _walk(node, "", lines)
        return (loader.construct_document(node) if node is not None else None), lines
    except _Refused as e:
        raise RecipeError(f"{where}:{e.line}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}:{line} not valid YAML: {problem}") from None
    finally:
        loader.dispose()


# --- --set ---------------------------------------------------------------------------------

def parse_overrides(items: list[str] | None, sections: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """`--set` items -> {dotted key: value}; values are YAML scalars or flow collections."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected SECTION.KEY=VALUE, like train.learning_rate=1e-4")
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)+", key):
            have = sorted(s for s, keys in (sections or {}).items() if key in keys)
            hint = f" (did you mean {' or '.join(f'{s}.{key}' for s in have)}?)" if have else ""
            raise RecipeError(f"--set {item!r}: the key must be dotted, SECTION.KEY like train.learning_rate{hint}")
        try:
            out[key] = load_yaml(val, f"--set {key}")[0] if val != "" else ""
        except RecipeError as e:
            raise RecipeError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return out


def set_dotted(d: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"{origin}: {dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(raw: dict, overrides: dict[str, Any], path: Path) -> None:
    quirks = raw.get("quirks") if isinstance(raw.get("quirks"), dict) else {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        name = rest.split(".")[0]
        if head == "quirks" and name not in quirks:
            known = ", ".join(sorted(quirks)) or "none"
            raise RecipeError(f"{path} (--set) {key}: unknown quirk {name!r} (this recipe's quirks: {known})")
        set_dotted(raw, key, value, f"{path} (--set)")


# --- validation and quirks -----------------------------------------------------------------

def validate(model: type[BaseModel], raw: dict, path: Path, lines: dict[str, int], overrides: dict[str, Any]) -> Any:
    """model.model_validate(raw), with the first problem as one line: file:line: key: what."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
            # pydantic appends union-member names to loc; keep the recipe's own keys only
            loc = [x for x in loc if x not in ("tuple[str, ...]", "literal['all-linear']")]
            key = ".".join(loc) or "(top level)"
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            got = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(err.get("input"), dict) \
                else f" (got {err.get('input')!r:.60})"
            msgs.append(f"{path}:{_where(key, lines, overrides)} {key}: {kind}{got}")
        msgs = list(dict.fromkeys(msgs))
        more = f" (and {len(msgs) - 1} more problem(s))" if len(msgs) > 1 else ""
        raise RecipeError(msgs[0] + more) from None


def _where(key: str, lines: dict[str, int], overrides: dict[str, Any]) -> str:
    if key in overrides:
        return " (--set)"
    probe = key
    while probe:
        if probe in lines:
            return f"{lines[probe]}:"
        probe = probe.rpartition(".")[0]
    return ""


def _hosts(value: Any) -> set[str]:
    """Hosts of every http(s) URL inside a value (strings, lists, mappings)."""
    if isinstance(value, str):
        u = urllib.parse.urlsplit(value.strip())
        return {(u.hostname or "").lower()} if u.scheme.lower() in ("http", "https") else set()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*(_hosts(v) for v in items)) if items else set()


def quirk_values(raw: dict, path: Path, lines: dict[str, int], overrides: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of every switched-on quirk, refusing sensitive keys and foreign hosts."""
    own_hosts = _hosts({k: v for k, v in raw.items() if k != "quirks"})
    out: dict[str, Any] = {}
    for name, q in (raw.get("quirks") or {}).items():
        if not q.get("fix"):
            continue
        for dotted, value in (q.get("when_fixed") or {}).items():
            where = f"{path}:{lines.get(f'quirks.{name}.when_fixed.{dotted}', lines.get(f'quirks.{name}', 1))}:"
            if dotted in SENSITIVE:
                raise RecipeError(f"{where} quirks.{name}.when_fixed: {dotted} decides which code or host is "
                                  "used; set it in the recipe's own section or with --set, not in a quirk")
            foreign = sorted(_hosts(value) - own_hosts)
            if foreign:
                raise RecipeError(f"{where} quirks.{name}.when_fixed.{dotted}: host {foreign[0]} is not used by "
                                  "the recipe's own sections; a quirk may not point the kit at a new host")
            if dotted not in overrides:  # the command line wins
                out[dotted] = value
    return out


def warn_code_switches(model: Any, where: str) -> None:
    """Say on stderr what will run when trust_remote_code or allow_pickle is on."""
    for key, what in CODE_SWITCHES.items():
        if getattr(model, key, False):
            print(f"qlora-kit: warning: {where}: model.{key} is on: {what} from {model.name} may run "
                  "on this machine", file=sys.stderr, flush=True)
