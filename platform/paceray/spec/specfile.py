"""Experiment specs: YAML -> `Spec`, checked against the trainable's `Config` before Ray starts.

A spec names what to train (`trainable`, `base`), what to search (`search`: dotted config path
-> distribution; `arms`: a list of joint settings, each one arm, crossed with `search` and the
seeds), how to schedule it (`tune`), on what (`resources`) and where to track it (`tracking`).
Every error is one line naming the file and the field.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from paceray.base.dotted import flatten, set_path
from paceray.base.errors import PacerayError, one_line
from paceray.base.paths import default_run_dir
from paceray.spec import registry

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SPEC_SECTIONS = ("tune", "resources", "tracking")  # --set on these changes the spec, not the trial


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of the keys, e.g. `{grid: [a, b]}` or `{loguniform: [1e-4, 1e-2]}`."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None  # [low, high), like ray.tune.randint

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self):
        return getattr(self, self.kind)

    def probe_values(self) -> list[Any]:
        """Values that must all pass the trainable's checks: every listed value, both ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def interior_value(self) -> Optional[float]:
        """A value a continuous range draws that its ends do not show: a fractional one (the ends
        of `uniform: [2, 8]` are integers; almost every draw is not)."""
        if self.kind not in ("uniform", "loguniform"):
            return None
        low, high = (float(v) for v in self.args)
        if self.kind == "loguniform":
            return math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low)))
        return low + 0.37 * (high - low)


class TuneSection(_Strict):
    metric: Optional[str] = None  # default: the trainable's
    mode: Optional[Literal["min", "max"]] = None  # default: the trainable's (with its own metric)
    num_samples: int = Field(1, ge=1)
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_evals: int = Field(1, ge=1)  # ASHA: evals a trial gets after it can be judged (see grace_steps)
    # ASHA's grace period in steps; default: the trainable's `judged_from` over the space plus
    # grace_evals evals. Lower than that is allowed, with a warning.
    grace_steps: Optional[int] = Field(None, ge=1)
    seeds: Optional[list[int]] = Field(None, min_length=1)  # every arm once per seed (grid and random)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: Optional[int] = Field(None, ge=1)
    seed: int = 0
    # Packed arms: up to this many arms that the trainable lets share a trial train in one, in
    # lockstep, each its own run (paceray.spec.packs); `auto`: as many as its memory estimate allows.
    pack: Union[Literal["auto"], int] = 1

    @model_validator(mode="after")
    def _pack_at_least_one(self) -> "TuneSection":
        if self.pack != "auto" and self.pack < 1:
            raise ValueError(f"pack must be a whole number of at least 1 or 'auto', got {self.pack}")
        return self


class ResourcesSection(_Strict):
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    trial_cpus: float = Field(0.0, ge=0)  # the Tune trial's own process (the Train driver)
    # Worker-group failures (a killed worker, a lost node) a trial restarts from its last
    # checkpoint before it fails (Ray Train's FailureConfig.max_failures).
    max_failures: int = Field(2, ge=0)
    # Elastic trials: with min_workers set, a trial runs on as few as min_workers ranks when
    # `workers` do not fit (a node lost, none coming back) and grows back when they do (Ray
    # Train's ScalingConfig(num_workers=(min, max))).
    min_workers: Optional[int] = Field(None, ge=1)
    # How long a trial waits for its worker group to be placed (all `workers`, or min_workers)
    # before it fails: Ray Train itself would retry for ever.
    worker_wait_s: float = Field(600.0, gt=0)
    # Ray's placement strategy for a trial's workers: strict-spread puts each rank on a node of
    # its own (DDP across nodes), pack (Ray Train's default) as few nodes as fit.
    placement: Literal["pack", "spread", "strict-pack", "strict-spread"] = "pack"
    # The network interface the process group (gloo, NCCL) uses on every node; by default each
    # rank uses the interface holding its node's Ray address, unless GLOO_SOCKET_IFNAME /
    # NCCL_SOCKET_IFNAME are set on the workers.
    socket_ifname: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*$")
    # What an autoscaling cluster can grow to ({CPU: 64, GPU: 8}), for sizing how many trials run
    # at once, where Ray does not report the autoscaler's maximum (it does for KubeRay's and Ray's
    # own autoscaler). Without either, a search is sized by the resources present when it starts.
    max_cluster: Optional[dict[Literal["CPU", "GPU"], float]] = None

    @model_validator(mode="after")
    def _fractional_only_alone(self) -> "ResourcesSection":
        # Fractional GPUs inside one DDP group hit NCCL "Duplicate GPU detected" (DESIGN).
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError("fractional gpus_per_worker only works with workers: 1")
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) is more than workers ({self.workers})")
        if self.max_cluster is not None and any(v < 0 for v in self.max_cluster.values()):
            raise ValueError("max_cluster: amounts must be at least 0")
        return self

    @property
    def fewest_workers(self) -> int:
        """The ranks a trial needs to run at all: min_workers for an elastic trial."""
        return self.min_workers or self.workers


class TrackingSection(_Strict):
    experiment: Optional[str] = None  # default: the spec's name
    uri: Optional[str] = None


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    trainable: str  # an entry point of paceray.trainables, or a dotted path module:OBJECT
    description: str = ""
    base: dict[str, Any] = {}
    search: dict[str, Distribution] = {}
    # Arms that differ in different settings (an order; a distribution with its weighting): each
    # a mapping of dotted paths to values, one arm, crossed with `search` and `tune.seeds`.
    arms: Optional[list[dict[str, Any]]] = Field(None, min_length=1)
    tune: TuneSection = TuneSection()
    resources: ResourcesSection = ResourcesSection()
    tracking: TrackingSection = TrackingSection()
    run_dir: Optional[str] = None

    # Filled by load(): where it came from and what the trainable made of `base`.
    path: Optional[str] = None

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @field_validator("arms")
    @classmethod
    def _arms_set_something(cls, arms):
        for i, arm in enumerate(arms or []):
            if not arm:
                raise ValueError(f"arms[{i}] sets nothing; an arm is a mapping of config paths to values, "
                                 f"e.g. {{curriculum.order: easy-to-hard}}")
        return arms


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PacerayError(f"--set {pair!r}: expected key=value, e.g. --set train.steps=100")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


# --------------------------------------------------------------------------- loading


def _pydantic_error(where: str, err: ValidationError, prefix: str = "") -> PacerayError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    field = f"{prefix}{loc}" if loc else prefix.rstrip(".: ") or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return PacerayError(one_line(f"{where}: {field}: {msg}{extra}"))


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PacerayError(f"{path}: no such spec file") from None
    except OSError as e:
        raise PacerayError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise PacerayError(one_line(f"{where}: malformed YAML: {problem}")) from None
    if not isinstance(data, dict):
        raise PacerayError(f"{path}: a spec is a YAML mapping with name, base, search, tune, resources")
    return data


def load(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> "LoadedSpec":
    """Read, override and check a spec; nothing is started and nothing is written."""
    path = Path(path).expanduser().resolve()
    data = read_yaml(path)
    try:
        spec = Spec.model_validate({**data, "path": str(path)})
    except ValidationError as e:
        raise _pydantic_error(str(path), e) from None
    base = copy.deepcopy(spec.base)
    search = dict(spec.search)
    arms = [flatten(arm) for arm in spec.arms or []]  # {curriculum: {order: x}} as curriculum.order
    spec_overrides = {k: v for k, v in (overrides or {}).items() if k.split(".")[0] in SPEC_SECTIONS}
    if spec_overrides:  # e.g. --set resources.gpus_per_worker=0 to try a GPU spec on a laptop
        raw = spec.model_dump(exclude={"search"})
        for key, value in spec_overrides.items():
            set_path(raw, key, value)
        try:
            spec = Spec.model_validate({**raw, "search": spec.search, "arms": spec.arms})
        except ValidationError as e:
            raise _pydantic_error(f"{path} (with --set)", e) from None
    for key, value in (overrides or {}).items():
        if key in spec_overrides:
            continue
        set_path(base, key, value)
        search.pop(key, None)  # --set pins a searched path
        for arm in arms:  # and a path the arms set
            arm.pop(key, None)
    trainable = registry.resolve(spec.trainable, str(path))
    config = check_config(trainable.config, base, str(path), "base.")
    check_arms(trainable.config, config, search, arms, str(path))
    for i, arm in enumerate(arms or [{}]):
        arm_base = config
        if arm:
            arm_base = copy.deepcopy(config)
            for key, value in arm.items():
                set_path(arm_base, key, value)
        check_search(trainable.config, arm_base, search, str(path), f" in arms[{i}]" if arm else "")
    check_seeds(spec, trainable, search, str(path), arms)
    check_arms_algorithm(spec, trainable, arms, str(path))
    check_pack(spec, trainable, str(path))
    # The metric and its mode: the spec's, else the trainable's (a spec naming another metric
    # says its mode too, or gets the trainable's).
    metric = spec.tune.metric or trainable.metric
    mode = spec.tune.mode or trainable.mode
    run_dir = Path(os.environ.get("PACERAY_RUN_DIR") or spec.run_dir or default_run_dir()).expanduser()
    return LoadedSpec(spec=spec, base=config, search=search, arms=arms, run_dir=run_dir.resolve(),
                      overrides=overrides or {}, trainable=trainable, metric=metric, mode=mode)


def check_config(config_cls, values: dict, where: str, prefix: str) -> dict:
    try:
        return config_cls.model_validate(values).model_dump(mode="json")
    except ValidationError as e:
        raise _pydantic_error(where, e, prefix) from None


def check_arms(config_cls, base: dict, search: dict[str, "Distribution"], arms: list[dict], where: str) -> None:
    """Every arm sets known fields to values of their type, none that `search` also searches, and
    is a valid trial config on its own (with the search: see check_search)."""
    known = set(flatten(base))
    for i, arm in enumerate(arms):
        for key, value in arm.items():
            if key not in known:
                raise PacerayError(f"{where}: arms[{i}].{key}: no such config field in trainable's Config")
            if key in search:
                raise PacerayError(f"{where}: arms[{i}].{key}: also in search; set it in the arms or search it, "
                                   f"not both")
            _check_declared_type(config_cls, key, Distribution(grid=[value]), where, f"arms[{i}].{key}")
        trial = copy.deepcopy(base)
        for key, value in arm.items():
            set_path(trial, key, value)
        try:
            config_cls.model_validate(trial)
        except ValidationError as e:
            raise _pydantic_error(where, e, f"arms[{i}]: ") from None


def check_search(config_cls, base: dict, search: dict[str, "Distribution"], where: str, context: str = "") -> None:
    """Every grid/choice value and both ends of every range must be a valid trial config
    (`context`: which arm's config `base` is, for the error)."""
    known = set(flatten(base))
    for key in search:
        if key not in known:
            raise PacerayError(f"{where}: search.{key}: no such config field in trainable's Config")
    for key, d in search.items():
        _check_declared_type(config_cls, key, d, where)
        _check_interior(config_cls, base, key, d, where)
    probes = [[(k, v) for v in d.probe_values()] for k, d in search.items()]
    # Each value alone, and (for small spaces) every combination: cross-field checks
    # (e.g. num_clusters ≤ timesteps) only show in combinations.
    combos = itertools.product(*probes) if _product_size(probes) <= 4096 else ([p] for ps in probes for p in ps)
    for combo in combos:
        trial = copy.deepcopy(base)
        for key, value in combo:
            set_path(trial, key, value)
        try:
            config_cls.model_validate(trial)
        except ValidationError as e:
            point = ", ".join(f"{k}={v!r}" for k, v in combo)
            err = _pydantic_error(where, e, "search: ")
            raise PacerayError(f"{err} (search point {point}{context})") from None


def check_pack(spec: Spec, trainable, where: str) -> None:
    """What a packed search cannot do yet fails here, in one line, before anything starts."""
    if spec.tune.pack == 1:
        return
    if trainable.packing is None:
        print(f"paceray: note: {where}: tune.pack: trainable {trainable.name!r} does not train packed arms "
              f"(Trainable.packing); every trial trains one", flush=True)
        return


def check_arms_algorithm(spec: Spec, trainable, arms: list[dict], where: str) -> None:
    """Tune's own random and Optuna searchers know no joint settings: arms need a grid search, or
    a packed random one (its arms are expanded on the driver, paceray.spec.packs, each sample's
    draws shared by every arm, as the seeds share them)."""
    t = spec.tune
    packed = t.pack != 1 and trainable.packing is not None
    if arms and t.algorithm != "grid" and not (t.algorithm == "random" and packed):
        raise PacerayError(f"{where}: arms: algorithm {t.algorithm} cannot cross a list of arms; use algorithm "
                           f"grid{', or random with tune.pack' if trainable.packing is not None else ''}")


def check_seeds(spec: Spec, trainable, search: dict, where: str, arms: list[dict] = ()) -> None:
    seeds = spec.tune.seeds
    if not seeds:
        return
    for i, arm in enumerate(arms):
        if trainable.seed_path in arm:
            raise PacerayError(f"{where}: arms[{i}].{trainable.seed_path}: tune.seeds gives the seeds; an arm "
                               f"does not set one")
    if trainable.seed_path is None:
        raise PacerayError(f"{where}: tune.seeds: trainable {trainable.name!r} names no seed path (Trainable.seed_path)")
    if trainable.seed_path in search:
        raise PacerayError(f"{where}: tune.seeds: {trainable.seed_path} is also in search; give the seeds once")
    if spec.tune.algorithm == "optuna":
        raise PacerayError(f"{where}: tune.seeds: replicates need algorithm grid or random (Optuna suggests each "
                           f"trial afresh); search {trainable.seed_path} with Optuna instead")
    if len(set(seeds)) != len(seeds):
        raise PacerayError(f"{where}: tune.seeds: {seeds} repeats a seed")


def _check_declared_type(config_cls, key: str, d: "Distribution", where: str, field: str = "") -> None:
    """A distribution checked against its field's declared type, not only against the values
    probed: a float range over an integer field (whatever its probes happen to draw), a float in
    a list over an integer field (`[64, 64.0]`), and a list that mixes kinds (`[1, "1"]`), which
    pydantic's lax mode would coerce on some trials and not others."""
    kinds = {_value_kind(v) for v in (d.args if d.kind in ("grid", "choice") else ()) if v is not None}  # None: unset
    if len({"number" if k in ("int", "float") else k for k in kinds}) > 1:
        raise PacerayError(f"{where}: search.{key}: {d.kind} {list(d.args)} mixes {', '.join(sorted(kinds))} values; "
                           f"give every value as the field's type")
    if not _integer_field(_annotation_at(config_cls, key)):
        return
    if d.kind in ("uniform", "loguniform"):
        raise PacerayError(f"{where}: search.{key}: {d.kind} {list(d.args)} draws fractional values over an integer "
                           f"field; use randint [low, high)")
    fractional = [v for v in (d.args if d.kind in ("grid", "choice") else ()) if _value_kind(v) == "float"]
    if fractional and field:
        raise PacerayError(f"{where}: {field}: {fractional[0]!r} given to an integer field; write a whole number "
                           f"without a decimal point")
    if fractional:
        raise PacerayError(f"{where}: search.{key}: {d.kind} {list(d.args)} gives {fractional[0]!r} to an integer "
                           f"field; write whole numbers without a decimal point")


def _value_kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _annotation_at(config_cls, dotted: str) -> Any:
    """The declared type of a dotted path in a pydantic model (None where it is not a field)."""
    annotation: Any = config_cls
    for part in dotted.split("."):
        model = next((t for t in _types_in(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return annotation


def _types_in(annotation: Any) -> list:
    """The types a (possibly Optional, Union or Annotated) annotation admits; a Literal's values' types."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return [type(a) for a in args]
    if origin in (Union, types.UnionType, typing.Annotated):
        return [t for a in args for t in _types_in(a)]
    return [annotation]


def _integer_field(annotation: Any) -> bool:
    types = set(_types_in(annotation)) if annotation is not None else set()
    return int in types and float not in types


def _check_interior(config_cls, base: dict, key: str, d: "Distribution", where: str) -> None:
    """A continuous range over a field that takes only some of its values (an integer field) fails
    here, not on every trial's workers."""
    value = d.interior_value()
    if value is None:
        return
    trial = copy.deepcopy(base)
    set_path(trial, key, value)
    try:
        config_cls.model_validate(trial)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        hint = "; use randint for an integer field" if "integer" in msg else ""
        raise PacerayError(one_line(f"{where}: search.{key}: {d.kind} {list(d.args)} draws values like {value:.4g}, "
                                    f"which the field rejects ({msg}){hint}")) from None


def _product_size(probes) -> int:
    n = 1
    for p in probes:
        n *= max(1, len(p))
    return n


class LoadedSpec(BaseModel):
    """A checked spec: `base` is the full trial config with defaults filled in."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: Spec
    base: dict[str, Any]
    search: dict[str, Distribution]
    arms: list[dict[str, Any]] = []  # the spec's arms, less the paths --set pins
    run_dir: Path
    overrides: dict[str, Any] = {}
    trainable: Any = None  # paceray.protocol.Trainable
    metric: str = ""
    mode: str = "min"

    @property
    def name(self) -> str:
        return self.spec.name
