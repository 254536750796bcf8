"""Which layer gets which scheme and algorithm: one default for every block Linear, or a recipe.

A recipe (YAML) maps layer-name patterns to a scheme and an algorithm:

    default:                      # every block Linear no rule or ignore pattern matches
      scheme: w4a16
      algorithm: awq
      group_size: 64              # optional weight-grid overrides: bits, group_size (-1: per channel), symmetric
    ignore: ["re:.*layers\\.0\\..*"]  # these stay in the source dtype
    rules:
      - match: "*.mlp.down_proj"  # exact name, glob, or "re:" + a regex (full match); a string or a list
        scheme: w8a8_dynamic
        algorithm: gptq
        priority: 1               # optional; the highest priority wins when rules overlap
        options: {act_order: true}
    smooth: true                  # optional, like --smooth/--no-smooth
    alpha: 0.8                    # optional, like --alpha

Errors, all before any work: a pattern that matches no quantizable layer; a layer matched by two
rules without a higher priority on one of them; unknown schemes or algorithms; unknown keys.
Ignore patterns win over rules. Only Linears inside decoder blocks are quantizable: embeddings, norms
and lm_head are never touched. Each `LayerAssignment.rule` says which rule chose it (for the manifest).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import ggml_mixes
from quantkit.formats.schemes import Scheme, get_scheme, ggml_scheme


@dataclass(frozen=True)
class LayerAssignment:
    scheme: Scheme
    algorithm: str
    rule: str                                  # which CLI option or recipe rule chose this
    options: dict = field(default_factory=dict, hash=False, compare=False)
    file_type: str | None = None               # a llama.cpp file type (Q4_K_M): the grid is chosen per tensor


def uniform_plan(layer_names: list[str], assignment: LayerAssignment) -> dict[str, LayerAssignment | None]:
    """Every layer gets the same assignment."""
    return {name: assignment for name in layer_names}


def make_scheme(name: str, bits: int | None = None, group_size: int | None = None,
                symmetric: bool | None = None) -> Scheme:
    """A registered scheme with optional weight-grid overrides (group_size -1: per channel). A llama.cpp
    file type (q4_k_m, gguf:q4_k_m) gives its base K grid here; `run.mixes` chooses each tensor's."""
    file_type = ggml_mixes.scheme_file_type(name)
    if file_type is not None:
        if (bits, group_size, symmetric) != (None, None, None):
            raise QuantkitError(f"{name} is llama.cpp's {file_type} file type: its grids are llama.cpp's per-tensor "
                                "choice, so --bits/--group-size/--sym/--asym do not apply")
        return ggml_scheme(ggml_mixes.BASE_TYPES[file_type])
    scheme = get_scheme(name)
    changes: dict = {}
    if bits is not None:
        changes["bits"] = bits
    if group_size is not None:
        if group_size == -1:
            changes.update(granularity="channel", group_size=None)
        elif group_size < 1:
            raise QuantkitError(f"group size must be positive or -1 (per channel), got {group_size}")
        else:
            changes.update(granularity="group", group_size=group_size)
    if symmetric is not None:
        changes["symmetric"] = symmetric
    return scheme.with_weight(**changes) if changes else scheme


def pattern_matches(pattern: str, name: str) -> bool:
    """Exact name, shell glob (* ? [...]), or ``re:`` + a regular expression matching the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


_TOP_KEYS = {"default", "ignore", "rules", "smooth", "alpha"}
_RULE_KEYS = {"match", "scheme", "algorithm", "bits", "group_size", "symmetric", "priority", "options"}


@dataclass
class _Rule:
    index: int
    patterns: list[str]
    assignment: LayerAssignment
    priority: int | None

    def describe(self) -> str:
        shown = ", ".join(self.patterns[:3]) + (f" and {len(self.patterns) - 3} more" if len(self.patterns) > 3 else "")
        return f"rule {self.index} (match: {shown})"


@dataclass
class Recipe:
    default: LayerAssignment | None
    rules: list[_Rule]
    ignore: list[str]
    smooth: bool | None = None
    alpha: float | None = None
    source: dict = field(default_factory=dict)   # the parsed YAML, recorded in the manifest

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise QuantkitError(f"recipe not found: {path}") from None
        except (OSError, yaml.YAMLError) as error:
            raise QuantkitError(f"cannot read recipe {path}: {' '.join(str(error).split())[:200]}") from None
        return cls.from_dict(data if data is not None else {}, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise QuantkitError(f"{where}: a recipe is a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
        _reject_unknown(data, _TOP_KEYS, where)
        default = _assignment(data["default"], "recipe default", where) if data.get("default") else None
        rules = []
        for index, raw in enumerate(data.get("rules") or [], start=1):
            if not isinstance(raw, dict) or "match" not in raw or "scheme" not in raw:
                raise QuantkitError(f"{where}: rule {index} needs 'match' and 'scheme'")
            _reject_unknown(raw, _RULE_KEYS, f"{where} rule {index}")
            patterns = [raw["match"]] if isinstance(raw["match"], str) else list(raw["match"])
            rule = _Rule(index, patterns, None, raw.get("priority"))  # type: ignore[arg-type]
            rule.assignment = _assignment(raw, f"recipe {rule.describe()}", where)
            rules.append(rule)
        ignore = data.get("ignore") or []
        ignore = [ignore] if isinstance(ignore, str) else list(ignore)
        if default is None and not rules:
            raise QuantkitError(f"{where}: give a 'default' or at least one rule")
        return cls(default, rules, ignore, data.get("smooth"), data.get("alpha"), data)

    def plan(self, layer_names: list[str]) -> tuple[dict[str, LayerAssignment | None], dict[str, str]]:
        """({layer: assignment or None}, {ignored layer: why}) for the model's quantizable layers."""
        for pattern in self.ignore + [p for rule in self.rules for p in rule.patterns]:
            if not any(pattern_matches(pattern, name) for name in layer_names):
                raise QuantkitError(f"recipe pattern '{pattern}' matches no quantizable layer "
                                    f"(e.g. {layer_names[0]}; only Linears inside decoder blocks)")
        plan: dict[str, LayerAssignment | None] = {}
        ignored: dict[str, str] = {}
        for name in layer_names:
            ignore = next((p for p in self.ignore if pattern_matches(p, name)), None)
            if ignore is not None:
                plan[name], ignored[name] = None, f"recipe ignore '{ignore}'"
                continue
            matched = [rule for rule in self.rules if any(pattern_matches(p, name) for p in rule.patterns)]
            plan[name] = self._choose(name, matched)
            if plan[name] is None:
                ignored[name] = "no rule matches and the recipe has no default"
        return plan, ignored

    def _choose(self, name: str, matched: list[_Rule]) -> LayerAssignment | None:
        if not matched:
            return self.default
        ranked = sorted(matched, key=lambda rule: rule.priority or 0, reverse=True)
        if len(ranked) > 1 and (ranked[0].priority or 0) == (ranked[1].priority or 0):
            raise QuantkitError(f"layer {name} is matched by {ranked[0].describe()} and {ranked[1].describe()} "
                                "with no higher priority on either; add 'priority' to one of them")
        return ranked[0].assignment


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise QuantkitError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _assignment(raw: dict, rule: str, where: str) -> LayerAssignment:
    from quantkit.algorithms.registry import check_options, get_algorithm, validate_grid

    if not isinstance(raw, dict) or "scheme" not in raw:
        raise QuantkitError(f"{where}: {rule} needs a 'scheme'")
    _reject_unknown(raw, _RULE_KEYS, f"{where} {rule}")
    scheme = make_scheme(raw["scheme"], raw.get("bits"), raw.get("group_size"), raw.get("symmetric"))
    algorithm = raw.get("algorithm", "rtn")
    get_algorithm(algorithm)
    options = dict(raw.get("options") or {})
    check_options(algorithm, options)
    validate_grid(algorithm, options, scheme.weight)
    return LayerAssignment(scheme, algorithm, rule, options, ggml_mixes.scheme_file_type(raw["scheme"]))
