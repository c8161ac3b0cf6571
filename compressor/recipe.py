"""Recipes: YAML files naming the stages to apply, validated strictly.

A typo in a recipe must fail loudly, not fall back to a default: unknown keys and wrong types are
errors that name the key and the file. Shipped recipes (recipes/*.yaml) are usable by name.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compressor import methods
from compressor.datasets import shipped_dir
from compressor.errors import CompressorError, check_choice, check_int, shown
from compressor.files import input_file
from compressor.methods import check_stages

RECIPES_DIR = shipped_dir("recipes")
# What users compress for; `compressor recipes` marks the shipped recipe recommended for each.
GOALS = {
    "size": "smallest at good quality",
    "speed": "faster inference, standard architecture",
    "data-free": "no calibration data",
}

MAX_SEED = 2**32 - 1  # what every random generator the toolkit seeds accepts
GRAM_DTYPES = ("float64", "float32")  # Gram accumulation: integer or 16-bit sums would be garbage


@dataclass
class CalibrationConfig:
    """dataset: a shipped set name (see calib_data/) or a path; samples x seq_len tokens in total.
    true_sequential: inside each decoder layer, collect a linear's input Gram only after the
    linears that run before it (q/k/v before o, gate/up before down) are compressed, so that
    every layer-internal linear is calibrated on what it will really receive (GPTQ's
    true-sequential; one more layer forward per linear group)."""

    dataset: str = "code"
    samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    gram_dtype: str = "float64"
    true_sequential: bool = False

    def __post_init__(self):
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise CompressorError(f"key 'dataset' must be a shipped set name or a path, got {shown(self.dataset)}")
        check_int("samples", self.samples, 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0, most=MAX_SEED)
        check_choice("gram_dtype", self.gram_dtype, GRAM_DTYPES)


@dataclass
class Recipe:
    name: str
    stages: list
    description: str = ""
    version: int = 1
    goal: str | None = None  # the user goal it is recommended for (GOALS), shown by `compressor recipes`
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    source: str = "<memory>"

    @property
    def needs_calibration(self) -> bool:
        return any(m.needs_gram for m in self.stages)

    def build(self) -> list:
        """Fresh stages for one run, from copies of this recipe's configs and bound to each other
        (the stages in `self.stages` only describe the recipe: running one Recipe twice, or two
        recipes sharing a config, can never carry one run's state into another)."""
        stages = [type(stage)(copy.deepcopy(stage.config)) for stage in self.stages]
        check_stages(stages, self.calibration, self.source)
        return stages

    def check_streamable(self) -> None:
        """Refuse, before any work, a recipe with a stage that needs the whole model in memory."""
        for stage in self.stages:
            why = stage.stream_refusal()
            if why:
                raise CompressorError(f"{self.source}: {stage.name} cannot run with --stream: {why}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "calibration": dataclasses.asdict(self.calibration),
            "stages": [{"method": m.name, **dataclasses.asdict(m.config)} for m in self.stages],
        }


# A recipe is a few dozen values. YAML aliases let 500 bytes stand for 10^9 of them (the "billion
# laughs"), which any walk over the loaded value then expands: expansion is counted and capped.
MAX_RECIPE_NODES = 10_000


class _RecipeLoader(yaml.SafeLoader):
    """safe_load, plus two rules: a key given twice in one mapping is an error naming it (PyYAML
    keeps the last one silently), and the document may stand for at most MAX_RECIPE_NODES values
    once its aliases are expanded."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` brings keys the mapping may override: only keys written here count
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if duplicate:
                raise CompressorError(f"line {key_node.start_mark.line + 1}: key {shown(key)} is given twice in one mapping; "
                                      "YAML would keep only the last, so delete one")
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node, sizes: dict, active: set) -> int:
    """How many values `node` stands for with every alias expanded; refuses a recursive alias and
    one past MAX_RECIPE_NODES. Shared nodes are sized once (memo), so this costs the file's size."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        raise CompressorError(f"line {node.start_mark.line + 1}: a YAML alias refers to a value that contains it; a recipe cannot be recursive")
    active.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, sizes, active) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, active) + _expanded_size(v, sizes, active) for k, v in node.value)
    active.discard(id(node))
    if size > MAX_RECIPE_NODES:
        raise CompressorError(f"line {node.start_mark.line + 1}: its YAML aliases expand to more than {MAX_RECIPE_NODES} values; "
                              "a recipe needs a few dozen, so write the values out")
    sizes[id(node)] = size
    return size


def parse(text: str, source: str = "<memory>"):
    """The YAML of a recipe under the rules of _RecipeLoader; errors name `source`."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except CompressorError as exc:
        raise CompressorError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise CompressorError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise CompressorError(f"{source}: nested too deeply for a recipe; a recipe is a mapping of a few levels") from None


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (object,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, val = typing.get_args(annotation) or (object, object)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, val) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _looks_numeric(value) -> bool:
    """A string PyYAML left as text although a user meant a number (YAML 1.1 wants `1.0e-3`, not `1e-3`)."""
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise CompressorError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"}
    for key, value in data.items():
        if key not in allowed:
            raise CompressorError(f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
        if not _type_ok(value, hints[key]):
            wanted = getattr(hints[key], "__name__", str(hints[key]))
            hint = f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e-3)" if _looks_numeric(value) else ""
            raise CompressorError(f"{where}: key '{key}' must be {wanted}, got {shown(value)}{hint}")
    try:
        return cls(**data)
    except CompressorError as exc:
        raise CompressorError(f"{where}: {exc}") from None


def _check_ratio(ratio: float, where: str) -> None:
    if not 0.0 < ratio < 1.0:
        raise CompressorError(f"{where}: ratio must be strictly between 0 and 1, got {ratio}")


def budget_override(target_size=None, target_bits=None) -> dict | None:
    """--target-size / --target-bits as the stage keys they set (a budgeting stage's `size` and
    `bits_per_weight`); None when neither is given."""
    if target_size is not None and target_bits is not None:
        raise CompressorError("--target-size and --target-bits are two ways to give one budget; pass one of them")
    if target_size is not None:
        return {"size": target_size, "bits_per_weight": None}
    if target_bits is not None:
        return {"size": None, "bits_per_weight": target_bits}
    return None


BUDGET_RECIPE = "target"  # what --target-size / --target-bits run when no recipe is named


def choose(spec, ratio: float | None = None, target_size=None, target_bits=None) -> Recipe:
    """The recipe a run uses: `spec` (a shipped name, a YAML path or a Recipe), or with no spec and
    a budget (--target-size / --target-bits) the shipped budget recipe, with the budget set."""
    budget = budget_override(target_size, target_bits)
    if spec is None:
        if budget is None:
            raise CompressorError("no recipe: pass -r RECIPE (see `compressor recipes`), or --target-size / --target-bits "
                                  "to let the toolkit choose per linear")
        spec = BUDGET_RECIPE
    if isinstance(spec, Recipe):
        if budget is not None:
            raise CompressorError("--target-size / --target-bits set the budget of a recipe loaded by name or path; "
                                  "with a Recipe object, put size or bits_per_weight in its allocate stage")
        return spec
    return load(str(spec), ratio, budget)


def from_dict(data: dict, source: str = "<memory>", ratio: float | None = None, budget: dict | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise CompressorError(f"{source}: a recipe must be a YAML mapping with a 'stages' list")
    data = dict(data)
    raw_stages = data.pop("stages", None)
    if not isinstance(raw_stages, list) or not raw_stages:
        raise CompressorError(f"{source}: 'stages' must be a non-empty list of {{method: ...}} mappings")
    calib = _build(CalibrationConfig, data.pop("calibration", {}) or {}, f"{source}: calibration")
    stages = []
    for i, raw in enumerate(raw_stages):
        where = f"{source}: stages[{i}]"
        if not isinstance(raw, dict) or "method" not in raw:
            raise CompressorError(f"{where}: each stage needs a 'method' key (one of: {', '.join(methods.names())})")
        raw = dict(raw)
        if not isinstance(raw["method"], str):
            raise CompressorError(f"{where}: key 'method' must be one method name (one of: {', '.join(methods.names())}), got {shown(raw['method'])}")
        try:
            method_cls = methods.get(raw.pop("method"))
        except CompressorError as exc:
            raise CompressorError(f"{where}: {exc}") from None
        config = _build(method_cls.Config, raw, f"{where} ({method_cls.name})")
        try:
            if ratio is not None and "ratio" in {f.name for f in dataclasses.fields(config)}:
                config = dataclasses.replace(config, ratio=ratio)  # --ratio: validated again by the config itself
            if budget is not None and set(budget) <= {f.name for f in dataclasses.fields(config)}:
                config = dataclasses.replace(config, **budget)  # --target-size / --target-bits, validated the same way
            stages.append(method_cls(config))
        except CompressorError as exc:
            raise CompressorError(f"{where} ({method_cls.name}): {exc}") from None
    if ratio is not None and not any("ratio" in {f.name for f in dataclasses.fields(s.config)} for s in stages):
        raise CompressorError(f"{source}: --ratio {ratio} was given, but no stage of this recipe ({', '.join(s.name for s in stages)}) takes a ratio; "
                              "leave out --ratio or choose a recipe with a rank or width stage")
    if budget is not None and not any(set(budget) <= {f.name for f in dataclasses.fields(s.config)} for s in stages):
        raise CompressorError(f"{source}: --target-size/--target-bits was given, but no stage of this recipe ({', '.join(s.name for s in stages)}) "
                              "spends a size budget; use -r target (or leave out -r)")
    check_stages(stages, calib, source)
    data.setdefault("name", Path(source).stem)
    unknown = set(data) - {"name", "description", "version", "goal"}
    if unknown:
        raise CompressorError(f"{source}: unknown key '{sorted(unknown)[0]}' (allowed: calibration, description, goal, name, stages, version)")
    if data.get("goal") is not None and data["goal"] not in GOALS:
        raise CompressorError(f"{source}: goal must be one of {', '.join(GOALS)}, got {shown(data['goal'])}")
    for key, kind in (("name", str), ("description", str), ("version", int)):
        if key in data and not _type_ok(data[key], kind):
            raise CompressorError(f"{source}: key '{key}' must be {kind.__name__}, got {shown(data[key])}")
    return Recipe(stages=stages, calibration=calib, source=source, **data)


def catalogue() -> list[dict]:
    """Name, description and goal of every shipped recipe, read from the YAML alone (no method
    is imported, so listing is instant)."""
    found = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        found.append({"name": path.stem, "description": data.get("description", ""), "goal": data.get("goal")})
    return found


def shipped() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load(spec: str, ratio: float | None = None, budget: dict | None = None) -> Recipe:
    """Load a recipe by shipped name (e.g. 'welore') or by path to a YAML file. budget: what
    budget_override gives for --target-size / --target-bits."""
    if ratio is not None:
        _check_ratio(ratio, "--ratio")
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{spec}.yaml"
        if not path.exists():
            raise CompressorError(f"unknown recipe '{spec}'; shipped recipes: {', '.join(shipped())}, or pass a path to a YAML file")
    try:
        text = input_file(path, "recipe").read_text(encoding="utf-8")
    except IsADirectoryError:
        raise CompressorError(f"recipe {path} is a folder; pass a YAML file or a shipped recipe name") from None
    except OSError as exc:
        raise CompressorError(f"cannot read recipe {path}: {exc.strerror}; check the path") from None
    except UnicodeDecodeError as exc:
        raise CompressorError(f"recipe {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    return from_dict(parse(text, str(path)), source=str(path), ratio=ratio, budget=budget)
