"""Mixed-bit palettization: a bit width per layer, chosen from each layer's measured effect on the output.

The recipe follows Apple's mixed-bit palettization of Stable Diffusion (``ml-stable-diffusion``,
``mixed_bit_compression_pre_analysis.py``: per-layer sensitivity, then the cheapest assignment that keeps a PSNR
bar) applied to SnapGen's few-step pipeline (paper §4, on-device deployment):

1. each compressible package (UNet, text encoders) is converted once; coremltools palettizes *every* weight at each
   offered width (``palettize_weights`` with one ``OpPalettizerConfig`` per op) and the dense weights are read back
   from the ``constexpr_lut_to_dense`` ops (``LUT[indices]``). coremltools clusters each weight on its own with a
   fixed seed, so these are exactly the weights a package with any mix of widths holds;
2. sensitivity of a layer (or layer group) at ``b`` bits: the PSNR of the pipeline's output -- the full sampling,
   text -> UNet x steps -> decoder, fixed prompts and seeds -- when only that layer is palettized (every other
   weight fp16), against the fp32 pipeline;
3. greedy assignment: start with every layer at the widest offered width and repeatedly lower the layer whose next
   step costs the least added error (``10**(-PSNR/10)``; the measured error of the all-widest assignment plus each
   move's own increase) per bit saved, while the predicted error stays under the bar; the chosen assignment is then measured end to end and, if it misses the bar, the
   last moves are undone one by one until it holds (so a stricter bar never gives fewer bits).

The result is a JSON recipe (:func:`save_recipe` / :func:`load_recipe`; ``packages/mixed`` via
``snapgen convert-coreml --variants mixed:RECIPE.json``). Layers are named by the parameter names of the traced
package module (e.g. ``unet.down_blocks.0.resnets.0.conv1.weight``), which coremltools turns into constant names
(``unet_down_blocks_0_resnets_0_conv1_weight_to_fp16``). Design notes: docs/coreml_mixed_bit.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compress import EIGHT_BIT_KINDS, NBITS, average_bits, average_stored_bits, decompressed_state_dict, \
    palettizable_parameters, palettize, stored_bits, swapped_parameters
from .validate import package_lut_bits  # noqa: F401  (public here too: it reads what a recipe wrote)

__all__ = [
    "RECIPE_FORMAT",
    "DEFAULT_BAR_DB",
    "DEFAULT_SEARCH_BITS",
    "MixedBitRecipe",
    "load_recipe",
    "save_recipe",
    "parse_bits",
    "greedy_moves",
    "MixedBitSearch",
    "palettized_candidates",
    "package_lut_bits",
    "search_mixed_bit",
]

RECIPE_FORMAT = "diffusers-snapgen/coreml-mixed-bit/1"
DEFAULT_BAR_DB = 35.0
DEFAULT_SEARCH_BITS = (2, 4, 6)


def parse_bits(value, argument: str = "bits") -> tuple[int, ...]:
    """``"2,4,6"`` or a sequence -> sorted, distinct widths from ``NBITS`` (at least one)."""
    if isinstance(value, str):
        try:
            items = [int(v) for v in value.split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(f"`{argument}` must be a comma list of integers from {NBITS}, got {value!r}.") from err
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise TypeError(f"`{argument}` must be a comma list or a sequence of ints, got {type(value).__name__}.")
    bad = [b for b in items if isinstance(b, bool) or not isinstance(b, int) or b not in NBITS]
    if bad or not items:
        raise ValueError(f"`{argument}` must be widths from {NBITS}, got {value!r}.")
    return tuple(sorted(set(items)))


@dataclass
class MixedBitRecipe:
    """Per-component ``{parameter name: nbits}`` plus metadata (bar, measured PSNR, bits per weight, settings)."""

    layers: dict[str, dict[str, int]]
    metadata: dict = field(default_factory=dict)
    path: str | None = None

    def for_component(self, name: str) -> dict[str, int] | None:
        """The component's assignment, or ``None`` when the recipe does not cover it (it then stays fp16)."""
        return self.layers.get(name)

    def check_component(self, name: str, eligible: Mapping) -> None:
        """ValueError naming the recipe file when it lists layers that ``eligible`` (the palettizable parameters of
        the package being exported) does not have: the recipe was made for another model or threshold."""
        unknown = sorted(set(self.layers.get(name, {})) - set(eligible))
        if unknown:
            raise ValueError(
                f"mixed-bit recipe {self._where()}: component {name!r} lists {len(unknown)} layer(s) this model has "
                f"no palettizable weight for (e.g. {unknown[0]!r}): recreate the recipe for this model with "
                "`snapgen convert-coreml --search-mixed-bit` (same --weight-threshold)."
            )

    def to_json(self) -> dict:
        return {"format": RECIPE_FORMAT, **self.metadata, "components": {
            name: {"average_bits_per_weight": self.metadata.get("component_bits", {}).get(name),
                   "layers": dict(sorted(layers.items()))} for name, layers in self.layers.items()}}

    def _where(self) -> str:
        return repr(Path(self.path).name) if self.path else "(in memory)"


def _recipe_error(path, problem: str) -> ValueError:
    return ValueError(f"mixed-bit recipe {str(path)!r}: {problem}; write a valid one with "
                      f"`snapgen convert-coreml --search-mixed-bit RECIPE.json` (format {RECIPE_FORMAT}).")


def load_recipe(path) -> MixedBitRecipe:
    """Read and validate a recipe file; ValueError naming the file and the fix on bad JSON, format or widths."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a recipe file path, got {type(path).__name__}.")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mixed-bit recipe {str(path)!r} is not a file: write one with "
                         "`snapgen convert-coreml --search-mixed-bit RECIPE.json`.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _recipe_error(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise _recipe_error(path, f"'format' must be {RECIPE_FORMAT!r}")
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        raise _recipe_error(path, "'components' must map component names (unet, text_encoder, ...) to layers")
    layers = {}
    for name, entry in components.items():
        table = entry.get("layers") if isinstance(entry, dict) else None
        if not isinstance(table, dict) or not table:
            raise _recipe_error(path, f"components.{name}.layers must map layer names to bit widths")
        bad = {k: v for k, v in table.items() if isinstance(v, bool) or v not in NBITS}
        if bad:
            key = next(iter(bad))
            raise _recipe_error(path, f"layer {key!r} of {name!r} has {bad[key]!r} bits; allowed widths are {NBITS}")
        layers[name] = {str(k): int(v) for k, v in table.items()}
    metadata = {k: v for k, v in data.items() if k not in ("format", "components")}
    group_size = metadata.get("group_size")  # the tables the search measured; the export applies the same
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise _recipe_error(path, "'group_size' must be a positive int (output channels per table), got "
                                  f"{group_size!r}")
    if metadata.get("eight_bit", "palette") not in EIGHT_BIT_KINDS:  # how its 8-bit layers are stored
        raise _recipe_error(path, f"'eight_bit' must be one of {EIGHT_BIT_KINDS}, got {metadata['eight_bit']!r}")
    return MixedBitRecipe(layers, metadata, str(path))


def save_recipe(recipe: MixedBitRecipe, path) -> Path:
    """Write ``recipe`` as JSON to ``path`` (temporary file renamed into place)."""
    if not isinstance(recipe, MixedBitRecipe):
        raise TypeError(f"`recipe` must be a MixedBitRecipe, got {type(recipe).__name__}.")
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix != ".json":
        raise ValueError(f"`path` must be a .json file path, got {path!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(recipe.to_json(), handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)
    recipe.path = str(path)
    return path


def _error(db: float) -> float:
    """Relative squared error of a PSNR (``10**(-dB/10)``); additive across independent layer errors."""
    return 0.0 if math.isinf(db) else 10.0 ** (-db / 10.0)


def _check_max_bits(max_bits) -> None:
    if max_bits is not None and (isinstance(max_bits, bool) or not isinstance(max_bits, (int, float))
                                 or not 1 <= max_bits <= 16):
        raise ValueError(f"`max_bits` must be None or a number of bits per weight in [1, 16] (e.g. 4.5), got "
                         f"{max_bits!r}.")


def _unit_stored_bits(sizes: Mapping, costs: Mapping | None, unit: str, b: int) -> int:
    """Bits ``unit`` stores at ``b`` bits: its ``costs`` (look-up tables included) when known, else size times b."""
    return sizes[unit] * b if costs is None else costs[unit][b]


def greedy_moves(sensitivity: Mapping, sizes: Mapping, bits: Sequence[int],
                 costs: Mapping | None = None) -> list[tuple[str, int]]:
    """The order in which the greedy search lowers units: ``[(unit, new_bits), ...]`` down to all-narrowest.

    ``sensitivity[unit][b]``: PSNR (dB) with only ``unit`` at ``b`` bits; ``sizes[unit]``: its weights. Each step
    takes the unit whose next narrower width adds the least error per bit saved (ties: larger unit first, then
    name), so the order does not depend on the bar. Bits saved are ``sizes[unit] * (old - new)``, or with
    ``costs[unit][b]`` (the unit's stored bits at ``b``, look-up tables included) ``costs[old] - costs[new]``.
    """
    widths = sorted(bits, reverse=True)
    level = {unit: 0 for unit in sizes}
    moves = []
    while True:
        best = None
        for unit, index in level.items():
            if index + 1 >= len(widths):
                continue
            old, new = widths[index], widths[index + 1]
            added = max(0.0, _error(sensitivity[unit][new]) - _error(sensitivity[unit][old]))
            saved = _unit_stored_bits(sizes, costs, unit, old) - _unit_stored_bits(sizes, costs, unit, new)
            key = (added / max(saved, 1e-9), -sizes[unit], unit)
            if best is None or key < best[0]:
                best = (key, unit, new)
        if best is None:
            return moves
        level[best[1]] += 1
        moves.append((best[1], best[2]))


def palettized_candidates(mlmodel, module, bits, target, group_size, weight_threshold, mode="kmeans", progress=None,
                          name: str = "", costs: dict | None = None, eight_bit: str = "palette"):
    """``({parameter: {b: fp16 tensor}}, {parameter: elements})``: every palettizable weight of ``mlmodel`` at each
    width in ``bits``, decompressed from the palettized program (one ``palettize_weights`` call per width).
    A ``costs`` dict is filled with ``{parameter: {b: stored bits}}`` (indices and look-up tables,
    :func:`~.compress.stored_bits`). ``eight_bit="linear"``: the 8-bit candidates are int8 with per-channel scales."""
    eligible = palettizable_parameters(mlmodel, module, weight_threshold)
    candidates = {p: {} for p in eligible}
    stored = {p: {} for p in eligible}
    for b in bits:
        start = time.perf_counter()
        model, _ = palettize(mlmodel, module, b, target, group_size, weight_threshold, mode=mode, eight_bit=eight_bit)
        state = decompressed_state_dict(model, module)
        program_bits = stored_bits(model, module)
        for p in eligible:
            if eligible[p]["numel"] > 2**b:
                candidates[p][b] = state[p].half()
                stored[p][b] = program_bits[p]
        if progress is not None:
            kind = "int8 linear quantization" if b == 8 and eight_bit == "linear" else f"{b}-bit {mode} palettization"
            progress(f"[{name}] {kind} of {len(eligible)} weights read back in "
                     f"{time.perf_counter() - start:.1f}s")
    candidates = {p: c for p, c in candidates.items() if len(c) == len(bits)}  # too small for some width: fp16
    if costs is not None:
        costs.update({p: stored[p] for p in candidates})
    return candidates, {p: eligible[p]["numel"] for p in candidates}


class MixedBitSearch:
    """Measured per-unit sensitivities and the greedy assignment under any bar (no re-measuring per bar).

    Args:
        candidates: ``{component: {parameter: {nbits: decompressed tensor}}}``.
        evaluate: ``evaluate({component: {parameter: tensor}}) -> PSNR dB`` of the output with those weights swapped
            in (everything else as the caller set it up: fp16 weights, fp32 reference).
        bits: the offered widths.
        groups: optional ``{unit name: [(component, parameter), ...]}``: layers that share one width (cheaper
            search for large models); default one unit per layer.
        costs: optional ``{component: {parameter: {nbits: stored bits}}}`` (look-up tables included,
            :func:`~.compress.stored_bits`): the greedy order then weighs bits saved with the tables counted, and
            the recipe also reports ``average_bits_per_weight_with_luts``.
    """

    def __init__(self, candidates: Mapping, evaluate: Callable, bits=DEFAULT_SEARCH_BITS, groups: Mapping | None = None,
                 progress=None, metadata: Mapping | None = None, costs: Mapping | None = None):
        self.bits = parse_bits(bits)
        if not candidates or not all(isinstance(v, Mapping) for v in candidates.values()):
            raise ValueError("`candidates` must map component names to {parameter: {nbits: tensor}}.")
        self.candidates = candidates
        self.evaluate = evaluate
        self.progress = progress
        self.metadata = dict(metadata or {})
        if groups is None:
            groups = {f"{c}/{p}": [(c, p)] for c, params in candidates.items() for p in params}
        missing = [(c, p) for members in groups.values() for c, p in members
                   if c not in candidates or p not in candidates[c]]
        if missing:
            raise ValueError(f"`groups` names weights without candidates: {missing[:3]}.")
        self.groups = {unit: list(members) for unit, members in groups.items() if members}
        self.sizes = {unit: sum(int(candidates[c][p][self.bits[0]].numel()) for c, p in members)
                      for unit, members in self.groups.items()}
        if costs is not None:
            lacking = [(c, p) for members in self.groups.values() for c, p in members
                       if not all(b in costs.get(c, {}).get(p, {}) for b in self.bits)]
            if lacking:
                raise ValueError(f"`costs` lacks stored bits for {lacking[:3]} at some of the widths {self.bits}.")
        self.costs = costs
        self.unit_costs = None if costs is None else {
            unit: {b: sum(int(costs[c][p][b]) for c, p in members) for b in self.bits}
            for unit, members in self.groups.items()}
        self.sensitivity: dict[str, dict[int, float]] = {}
        self._measured: dict[int, float] = {}
        self.evaluations = 0

    def _log(self, message):
        if self.progress is not None:
            self.progress(message)

    def _states(self, assignment: Mapping[str, int]) -> dict:
        states = {}
        for unit, b in assignment.items():
            for c, p in self.groups[unit]:
                states.setdefault(c, {})[p] = self.candidates[c][p][b]
        return states

    def _run(self, assignment) -> float:
        self.evaluations += 1
        return float(self.evaluate(self._states(assignment)))

    def measure(self) -> dict:
        """PSNR with only one unit palettized, for every unit and width (``len(units) * len(bits)`` evaluations)."""
        start = time.perf_counter()
        for index, unit in enumerate(self.groups):
            self.sensitivity[unit] = {b: self._run({unit: b}) for b in self.bits}
            if (index + 1) % 25 == 0 or index + 1 == len(self.groups):
                self._log(f"sensitivity: {index + 1}/{len(self.groups)} units ({time.perf_counter() - start:.0f}s)")
        return self.sensitivity

    def use_sensitivities(self, sensitivity_db: Mapping) -> None:
        """Take sensitivities measured before (a recipe's ``sensitivity_db``: ``{unit: {"bits": dB}}``) instead of
        measuring them; they must cover exactly this search's units, at (at least) its widths."""
        widths = {str(b) for b in self.bits}
        if not isinstance(sensitivity_db, Mapping) or set(sensitivity_db) != set(self.groups) or any(
                not isinstance(v, Mapping) or not widths <= set(map(str, v)) for v in sensitivity_db.values()):
            raise ValueError(f"the saved sensitivities do not cover this search's {len(self.groups)} units at "
                             f"{sorted(self.bits)} bits; search with the settings the recipe was searched with.")
        self.sensitivity = {unit: {b: float(values[str(b)]) for b in self.bits}
                            for unit, values in sensitivity_db.items()}
        self._moves = None

    def assignment(self, moves: int) -> dict[str, int]:
        widest = self.bits[-1]
        assignment = {unit: widest for unit in self.groups}
        for unit, b in self.order[:moves]:
            assignment[unit] = b
        return assignment

    @property
    def order(self) -> list[tuple[str, int]]:
        """The greedy order of moves (measures the sensitivities first if needed)."""
        if not self.sensitivity:
            self.measure()
        if getattr(self, "_moves", None) is None:
            self._moves = greedy_moves(self.sensitivity, self.sizes, self.bits, self.unit_costs)
        return self._moves

    def measured_psnr(self, moves: int) -> float:
        if moves not in self._measured:
            self._measured[moves] = self._run(self.assignment(moves))
        return self._measured[moves]

    def _stored_bits(self, unit: str, b: int) -> int:
        return _unit_stored_bits(self.sizes, self.unit_costs, unit, b)

    def _moves_within_bits(self, max_bits: float) -> int:
        """The fewest greedy moves after which the average stored bits per weight is <= ``max_bits`` (all of them
        when even the narrowest assignment is larger)."""
        total = sum(self.sizes.values())
        level = {unit: self.bits[-1] for unit in self.groups}
        stored = sum(self._stored_bits(unit, b) for unit, b in level.items())
        moves = 0
        for unit, b in self.order:
            if stored <= max_bits * total:
                break
            stored += self._stored_bits(unit, b) - self._stored_bits(unit, level[unit])
            level[unit] = b
            moves += 1
        return moves

    def recipe(self, bar_db: float = DEFAULT_BAR_DB, max_bits: float | None = None) -> MixedBitRecipe:
        """The cheapest assignment found that keeps the end-to-end PSNR >= ``bar_db`` (measured, not predicted).

        When even every unit at the widest width misses the bar, that assignment is returned with
        ``meets_bar: false`` in the metadata. With ``max_bits`` the recipe is instead the best one of that size:
        the first assignment of the greedy order whose average bits per weight (look-up tables included when the
        search knows them) is <= ``max_bits``, measured and reported against ``bar_db`` (``meets_bar``) and
        ``max_bits`` (``meets_max_bits``).
        """
        if isinstance(bar_db, bool) or not isinstance(bar_db, (int, float)) or not math.isfinite(bar_db):
            raise ValueError(f"`bar_db` must be a finite number of dB (e.g. {DEFAULT_BAR_DB}), got {bar_db!r}.")
        _check_max_bits(max_bits)
        order = self.order
        widest = self.bits[-1]
        if max_bits is not None:
            moves = self._moves_within_bits(max_bits)
        else:
            allowed = _error(bar_db)
            # additive model around the measured all-widest assignment: each move adds its unit's own error increase
            predicted = _error(self.measured_psnr(0))
            moves = 0
            for unit, b in order:
                old = self.assignment(moves)[unit]
                step = max(0.0, _error(self.sensitivity[unit][b]) - _error(self.sensitivity[unit][old]))
                if predicted + step > allowed:
                    break
                predicted += step
                moves += 1
            while moves > 0 and self.measured_psnr(moves) < bar_db:
                moves -= 1
        value = self.measured_psnr(moves)
        assignment = self.assignment(moves)
        layers: dict[str, dict[str, int]] = {}
        for unit, b in assignment.items():
            for c, p in self.groups[unit]:
                layers.setdefault(c, {})[p] = b
        sizes = {c: {p: int(self.candidates[c][p][widest].numel()) for p in params}
                 for c, params in self.candidates.items()}
        all_sizes = {f"{c}/{p}": n for c, params in sizes.items() for p, n in params.items()}
        all_bits = {f"{c}/{p}": b for c, params in layers.items() for p, b in params.items()}
        metadata = {
            **self.metadata,
            "bar_db": float(bar_db),
            "measured_psnr_db": round(value, 3),
            "meets_bar": bool(value >= bar_db),
            "average_bits_per_weight": average_bits(all_bits, all_sizes),
            "component_bits": {c: average_bits(layers.get(c, {}), sizes[c]) for c in self.candidates},
            "bits_offered": list(self.bits),
            "units": len(self.groups),
            "moves_applied": moves,
            "evaluations": self.evaluations,
            "sensitivity_db": {u: {str(b): round(v, 2) for b, v in s.items()} for u, s in self.sensitivity.items()},
        }
        if self.costs is not None:
            stored = {c: {p: int(self.costs[c][p][b]) for p, b in params.items()} for c, params in layers.items()}
            all_stored = {f"{c}/{p}": v for c, params in stored.items() for p, v in params.items()}
            metadata["average_bits_per_weight_with_luts"] = average_stored_bits(all_stored, all_sizes)
            metadata["component_bits_with_luts"] = {c: average_stored_bits(stored.get(c, {}), sizes[c])
                                                    for c in self.candidates}
        if max_bits is not None:
            average = metadata.get("average_bits_per_weight_with_luts", metadata["average_bits_per_weight"])
            metadata.update(max_bits=float(max_bits), meets_max_bits=bool(average <= max_bits))
        if any(len(m) > 1 for m in self.groups.values()):
            metadata["groups"] = {u: [f"{c}/{p}" for c, p in m] for u, m in self.groups.items()}
        luts = metadata.get("average_bits_per_weight_with_luts")
        self._log(("" if max_bits is None else f"at most {max_bits} bits/weight, ")
                  + f"bar {bar_db} dB: {metadata['average_bits_per_weight']} bits/weight"
                  + ("" if luts is None else f" ({luts} with look-up tables)") + f", measured {value:.2f} dB "
                  f"({moves} of {len(order)} moves)")
        return MixedBitRecipe(layers, metadata)


@contextlib.contextmanager
def swapped_states(modules: Mapping[str, torch.nn.Module], states: Mapping[str, Mapping]):
    """Swap ``states[name]`` into ``modules[name]`` for every listed component (restored on exit)."""
    with contextlib.ExitStack() as stack:
        for name, state in states.items():
            if state:
                stack.enter_context(swapped_parameters(modules[name], state))
        yield


def search_mixed_bit(
    pipe,
    output=None,
    bar_db: float = DEFAULT_BAR_DB,
    bits=DEFAULT_SEARCH_BITS,
    resolution: int | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    target: str = "iOS18",
    group_size: int = 16,
    weight_threshold: int = 2048,
    components: Sequence[str] = ("unet", "text"),
    palettize_mode: str = "kmeans",
    group_depth: int | None = None,
    eight_bit: str = "palette",
    progress=print,
    max_bits: float | None = None,
    sensitivities_from=None,
):
    """Search a mixed-bit recipe for ``pipe`` that keeps the end-to-end image PSNR >= ``bar_db``; returns
    ``(recipe, search)`` (``search.recipe(other_bar)`` reuses the measurements) and writes ``output`` (.json) if
    given. With ``max_bits`` the recipe is the best one of at most that many bits per weight (look-up tables
    included), its PSNR reported against ``bar_db`` (:meth:`MixedBitSearch.recipe`).

    ``sensitivities_from`` (a recipe file this function wrote, with the same settings, prompts and seeds, and offering at
    least ``bits``) reuses its per-layer sensitivities instead of measuring them again: a recipe at another bar, size
    or subset of widths then costs one conversion, the palettization and a few pipeline runs. The saved values are
    rounded to 0.01 dB, so near-ties may order differently than in the original search.

    Converts the compressible packages in ``components`` (``"unet"``, ``"text"``), palettizes each weight at every
    width in ``bits`` and measures the full sampling at ``resolution`` (default: the model's native size) on
    ``prompts``/``seeds`` (default :data:`~.quality.DEFAULT_QUALITY_PROMPTS`). ``group_depth=k`` makes layers that
    share the first ``k`` parts of their name (``unet.down_blocks.0``) one unit with one width (fewer evaluations).
    ``eight_bit="linear"`` offers 8 bits as int8 with per-channel scales instead of 8-bit tables (recorded in the
    recipe, which the export then applies the same way).
    """
    from .components import parse_components, pipeline_components
    from .convert import TARGETS, convert_module
    from .quality import EndToEndQuality

    bits = parse_bits(bits)
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}.")
    if eight_bit not in EIGHT_BIT_KINDS:
        raise ValueError(f"`eight_bit` must be one of {EIGHT_BIT_KINDS}, got {eight_bit!r}.")
    if output is not None and (not isinstance(output, (str, os.PathLike)) or Path(output).suffix != ".json"):
        raise ValueError(f"`output` must be a .json file path for the recipe, got {output!r}.")
    groups = parse_components(components)
    if group_depth is not None and (isinstance(group_depth, bool) or not isinstance(group_depth, int)
                                    or group_depth < 1):
        raise ValueError(f"`group_depth` must be None (one unit per layer) or an int >= 1, got {group_depth!r}.")
    if "decoder" in groups:
        raise ValueError("`components`: the decoder is never palettized; search 'unet' and/or 'text'.")
    _check_max_bits(max_bits)
    saved = None
    if sensitivities_from is not None:
        saved = load_recipe(sensitivities_from)
        if "sensitivity_db" not in saved.metadata:
            raise ValueError(f"`sensitivities_from` {str(sensitivities_from)!r} holds no 'sensitivity_db': pass a "
                             "recipe written by search_mixed_bit.")
        if not set(bits) <= set(saved.metadata.get("bits_offered", ())):
            raise ValueError(f"`sensitivities_from` {str(sensitivities_from)!r} was searched with other settings "
                             f"(bits_offered {saved.metadata.get('bits_offered')} lacks some of {list(bits)}).")
    if resolution is None:
        resolution = pipe.default_sample_size * pipe.vae_scale_factor
    has_text = getattr(pipe, "text_encoder_mode", None) is not None
    specs = pipeline_components(pipe, resolution, ["unet", "decoder"] + (["text"] if has_text else []))
    quality = EndToEndQuality(pipe, specs, resolution, prompts, seeds)
    # fp16 packages hold the parameters cast to fp16: the baseline of every evaluation
    base = {spec.name: {k: v.detach().half() for k, v in spec.module.named_parameters()} for spec in specs}

    def evaluate(states):
        return quality.psnr({name: {**state, **states.get(name, {})} for name, state in base.items()})

    metadata = {
        "target": target,
        "group_size": group_size,
        "weight_threshold": weight_threshold,
        "palettize_mode": palettize_mode,
        "eight_bit": eight_bit,
        "quality": quality.settings(),
        "baseline": "fp32 pipeline; weights outside the evaluated layers hold their fp16 package values",
    }
    fp16 = evaluate({})
    metadata["fp16_psnr_db"] = round(fp16, 3) if math.isfinite(fp16) else "inf"
    if saved is not None:  # before any conversion: the saved sensitivities must be of these settings and weights
        differing = sorted(k for k, v in metadata.items() if k not in ("baseline", "fp16_psnr_db")
                           and json.loads(json.dumps(saved.metadata.get(k))) != json.loads(json.dumps(v)))
        old_fp16 = saved.metadata.get("fp16_psnr_db")  # the fp16 weights' PSNR tells whether the model is the same
        if old_fp16 != metadata["fp16_psnr_db"] and not (
                isinstance(old_fp16, (int, float)) and math.isfinite(fp16) and abs(old_fp16 - fp16) <= 0.1):
            differing.append(f"fp16_psnr_db {old_fp16} vs {metadata['fp16_psnr_db']}: other weights?")
        if differing:
            raise ValueError(f"`sensitivities_from` {str(sensitivities_from)!r} was searched with other settings "
                             f"({', '.join(differing)}); search again or pass the same settings.")
    candidates, costs = {}, {}
    for spec in specs:
        if not (spec.compressible and spec.group in groups):
            continue
        start = time.perf_counter()
        mlmodel, _, _ = convert_module(spec.module, spec.inputs, spec.output_names, target=target)
        if progress is not None:
            progress(f"[{spec.name}] converted in {time.perf_counter() - start:.1f}s")
        costs[spec.name] = {}
        candidates[spec.name], _ = palettized_candidates(
            mlmodel, spec.module, bits, target, group_size, weight_threshold, palettize_mode, progress, spec.name,
            costs=costs[spec.name], eight_bit=eight_bit)
        del mlmodel
    if not any(candidates.values()):
        raise ValueError(f"`components` {groups} hold no weight above `weight_threshold`={weight_threshold}: "
                         "lower the threshold or search other components.")
    units = None
    if group_depth is not None:
        units = {}
        for name, params in candidates.items():
            for param in params:
                units.setdefault(f"{name}/{'.'.join(param.split('.')[:group_depth])}", []).append((name, param))
    search = MixedBitSearch(candidates, evaluate, bits, groups=units, progress=progress, metadata=metadata,
                            costs=costs)
    if saved is None:
        search.measure()
    else:
        search.use_sensitivities(saved.metadata["sensitivity_db"])
        if progress is not None:
            progress(f"sensitivities of {len(search.groups)} units from {sensitivities_from}")
    recipe = search.recipe(bar_db, max_bits=max_bits)
    if output is not None:
        save_recipe(recipe, output)
        if progress is not None:
            progress(f"wrote {output}")
    return recipe, search
