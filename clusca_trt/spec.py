"""One spec drives export, build and run.

``ExportSpec`` names every graph (cond, plain, full, partial, forecast, cluster_<group>,
select_<group>), with the names, static shapes and dtypes of its inputs and outputs. The
exporter traces from it, the engines check their inputs against it and allocate device buffers
from it, the runtime knows from it which tensors stay on the device between steps (the *state*:
every graph output but ``out``; an output ``X_out`` replaces the state tensor ``X``).

Conditioning (``cond``): what a step computes from its timestep and labels/prompts alone, never
from the latents (DiT's adaLN modulation of every block), is computed for ``cond_steps`` steps
in one call of the ``cond`` graph into state tables ``<name>_table`` ``[cond_steps * B, ...]``;
every model step graph takes ``cond_row`` ``[B]`` (the table rows of its step) and gathers its
rows, so partial and forecast steps read none of those weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import is_int
from .errors import ConfigError

OUT = "out"  # the model output: the only tensor the runtime brings to the host each step
STATE_SUFFIX = "_out"

GRAPH_COND = "cond"  # latent-independent conditioning of many steps at once
GRAPH_PLAIN = "plain"  # the model alone: no caches (method full)
GRAPH_FULL = "full"
GRAPH_PARTIAL = "partial"
GRAPH_FORECAST = "forecast"
STEP_GRAPHS = (GRAPH_PLAIN, GRAPH_FULL, GRAPH_PARTIAL, GRAPH_FORECAST)  # one adapter forward, four step contexts
WEIGHTED_GRAPHS = (GRAPH_COND, *STEP_GRAPHS)  # the graphs with the model's weights (low precision applies)
COND_ROW = "cond_row"
UPDATE = "update"  # the partial graph's update rule per block: [blocks, (residual, keep, correction)]
UPDATE_SIZE = 3
PAIR = "pair"  # the cluster graph's flag: the rows of a sample (guidance halves) share one clustering
TABLE_SUFFIX = "_table"

DTYPES = ("float32", "int64")
MAX_BATCH = 1024  # samples per engine call (a memory estimate at build time may lower it)
MAX_KMEANS_ITERATIONS = 100  # the Lloyd loop is unrolled in the cluster graph


def cache_name(slot: str, factor: str, layer: int) -> str:
    """The state tensor of one module cache's factor (``f0`` or ``fhi``) at one block."""
    return f"{slot}_{factor}_{layer}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def state_name(self) -> str:
        return self.name[: -len(STATE_SUFFIX)] if self.name.endswith(STATE_SUFFIX) else self.name


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class CacheSlot:
    """A module cache: one branch output (before gating) of ``layers`` blocks.

    fresh_group: the token group whose clusters pick this branch's fresh rows in a partial
    step (the MLP branches), or None for a branch that is only forecast (attention).
    """

    name: str
    layers: int
    tokens: int
    dim: int
    fresh_group: str | None = None


@dataclass(frozen=True)
class TokenGroup:
    """Tokens that are clustered together (DiT: all image tokens; FLUX: image, text)."""

    name: str
    tokens: int
    dim: int
    clusters: int


@dataclass(frozen=True)
class BuildOptions:
    """What a build is static in. ``batch`` counts samples per engine call; with classifier-free
    guidance the graphs run ``2 * batch`` rows. ``clusters`` is K of the image tokens;
    ``text_clusters`` K of the text tokens where a family has them (FLUX, HunyuanVideo), None: the same as
    K, at most the text tokens."""

    batch: int = 1
    clusters: int = 16
    text_clusters: int | None = None
    order: int = 2
    kmeans_iterations: int = 10
    distance: str = "l2"  # k-means: squared L2 by one MatMul (l1: the reference's; docs/algorithm.md says why)
    dtype: str = "float32"
    opset: int = 20  # 20: GELU is one Gelu node (18: a chain of Mul/Pow/Tanh)
    cond_steps: int = 50

    def __post_init__(self) -> None:
        if not is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"batch must be an integer in 1..{MAX_BATCH}, got {self.batch!r}")
        if not is_int(self.clusters) or self.clusters < 0:
            raise ConfigError(f"clusters must be an integer >= 0, got {self.clusters!r}")
        if self.text_clusters is not None and (not is_int(self.text_clusters) or self.text_clusters < 0):
            raise ConfigError(f"text clusters must be an integer >= 0 or None, got {self.text_clusters!r}")
        if not is_int(self.order) or not 0 <= self.order <= 8:
            raise ConfigError(f"order must be an integer in [0, 8], got {self.order!r}")
        if not is_int(self.kmeans_iterations) or not 1 <= self.kmeans_iterations <= MAX_KMEANS_ITERATIONS:
            raise ConfigError(
                f"kmeans iterations must be an integer in 1..{MAX_KMEANS_ITERATIONS}, got {self.kmeans_iterations!r}"
            )
        if self.distance not in ("l1", "l2"):
            raise ConfigError(f"distance must be 'l1' or 'l2', got {self.distance!r}")
        if self.dtype != "float32":
            raise ConfigError(f"dtype must be 'float32' for ONNX export, got {self.dtype!r}")
        if not is_int(self.opset) or not 18 <= self.opset <= 20:
            raise ConfigError(f"opset must be in 18..20, got {self.opset}")
        if not is_int(self.cond_steps) or not 1 <= self.cond_steps <= 1000:
            raise ConfigError(f"cond steps must be an integer in 1..1000, got {self.cond_steps!r}")
        for name in ("batch", "clusters", "order", "kmeans_iterations", "opset", "cond_steps"):  # plain ints (JSON)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.text_clusters is not None:
            object.__setattr__(self, "text_clusters", int(self.text_clusters))


@dataclass(frozen=True)
class ExportSpec:
    """model_inputs: what a step graph is fed per step (the latents, and whatever else changes per
    step and is not conditioning); cond_inputs: per row of the graph batch, what the conditioning
    is computed from (timesteps, labels); cond_tensors: the conditioning a step uses, per row
    (shape ``[graph batch, ...]``). Without cond_tensors every input is a model input."""

    family: str
    options: BuildOptions
    model_inputs: tuple[TensorSpec, ...]
    output_shape: tuple[int, ...]
    slots: tuple[CacheSlot, ...]
    groups: tuple[TokenGroup, ...]
    graph_batch: int
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    cond_inputs: tuple[TensorSpec, ...] = ()
    cond_tensors: tuple[TensorSpec, ...] = ()

    # -- names ---------------------------------------------------------------------------
    def group(self, name: str) -> TokenGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def fresh_layers(self, group: str) -> int:
        return max((s.layers for s in self.slots if s.fresh_group == group), default=0)

    @property
    def clustered_groups(self) -> tuple[TokenGroup, ...]:
        return tuple(g for g in self.groups if g.clusters > 0 and self.fresh_layers(g.name) > 0)

    @property
    def update_blocks(self) -> int:
        """Blocks with fresh rows (the most of any clustered group): the partial graph's ``update``
        input has one rule per block."""
        return max((self.fresh_layers(g.name) for g in self.clustered_groups), default=0)

    @property
    def cond_rows(self) -> int:
        """Rows of the conditioning tables: ``cond_steps`` steps of the graph batch."""
        return self.options.cond_steps * self.graph_batch

    def cond_tables(self) -> list[TensorSpec]:
        """The conditioning tables (engine state written by the ``cond`` graph)."""
        return [TensorSpec(t.name + TABLE_SUFFIX, (self.cond_rows, *t.shape[1:]), t.dtype) for t in self.cond_tensors]

    def step_inputs(self) -> list[TensorSpec]:
        """What every model step graph takes before its own inputs: the model inputs, then the
        step's table rows and the tables (with conditioning), else the conditioning inputs."""
        if not self.cond_tensors:
            return list(self.model_inputs) + list(self.cond_inputs)
        return list(self.model_inputs) + [TensorSpec(COND_ROW, (self.graph_batch,), "int64")] + self.cond_tables()

    def cache_tensors(self) -> list[TensorSpec]:
        """Every module cache, one tensor per block and factor: ``<slot>_f0_<layer>`` [B, T, D] and,
        with O > 0, ``<slot>_fhi_<layer>`` [O, B, T, D] (F_1 .. F_O). Per block, so a step reads and
        writes each block's factors in place: no slice or stack of a whole cache."""
        B, O = self.graph_batch, self.options.order
        out = []
        for s in self.slots:
            for i in range(s.layers):
                out.append(TensorSpec(cache_name(s.name, "f0", i), (B, s.tokens, s.dim)))
                if O > 0:
                    out.append(TensorSpec(cache_name(s.name, "fhi", i), (O, B, s.tokens, s.dim)))
        return out

    def _make_graphs(self) -> dict[str, GraphSpec]:
        B, O = self.graph_batch, self.options.order
        caches = self.cache_tensors()
        model_out = TensorSpec(OUT, self.output_shape)
        graphs: dict[str, GraphSpec] = {}
        step_in = self.step_inputs()

        if self.cond_tensors:
            R = self.cond_rows
            graphs[GRAPH_COND] = GraphSpec(
                GRAPH_COND,
                tuple(TensorSpec(t.name, (R, *t.shape[1:]), t.dtype) for t in self.cond_inputs),
                tuple(TensorSpec(t.name + STATE_SUFFIX, t.shape, t.dtype) for t in self.cond_tables()),
            )
        graphs[GRAPH_PLAIN] = GraphSpec(GRAPH_PLAIN, tuple(step_in), (model_out,))

        full_in = list(step_in)
        if O > 0:
            full_in += [TensorSpec("taylor_coef", (O,))] + caches
        full_out = [model_out]
        full_out += [TensorSpec(f"hidden_{g.name}", (B, g.tokens, g.dim)) for g in self.clustered_groups]
        full_out += [TensorSpec(c.name + STATE_SUFFIX, c.shape) for c in caches]
        graphs[GRAPH_FULL] = GraphSpec(GRAPH_FULL, tuple(full_in), tuple(full_out))

        coef = TensorSpec("forecast_coef", (O + 1,))
        graphs[GRAPH_FORECAST] = GraphSpec(GRAPH_FORECAST, tuple(step_in + [coef] + caches), (model_out,))

        if self.clustered_groups:
            # one propagation ratio per clustered group, in the order of ``clustered_groups``
            gamma = TensorSpec("gamma", (len(self.clustered_groups),))
            # the update rule of the fresh rows, per block (``ops.UPDATE_FIELDS``: residual, keep, correction)
            update = TensorSpec(UPDATE, (self.update_blocks, UPDATE_SIZE))
            part_in = step_in + [coef, gamma, update]
            for g in self.clustered_groups:
                part_in.append(TensorSpec(f"assign_{g.name}", (B, g.tokens), "int64"))
                part_in.append(TensorSpec(f"fresh_{g.name}", (self.fresh_layers(g.name), B, g.clusters), "int64"))
            part_in += caches
            part_out = [model_out] + [
                TensorSpec(cache_name(s.name, "f0", i) + STATE_SUFFIX, (B, s.tokens, s.dim))
                for s in self.slots
                if s.fresh_group is not None and self.group(s.fresh_group).clusters > 0
                for i in range(s.layers)
            ]
            graphs[GRAPH_PARTIAL] = GraphSpec(GRAPH_PARTIAL, tuple(part_in), tuple(part_out))

        for g in self.clustered_groups:
            K, T, D, L = g.clusters, g.tokens, g.dim, self.fresh_layers(g.name)
            graphs[f"cluster_{g.name}"] = GraphSpec(
                f"cluster_{g.name}",
                (
                    TensorSpec(f"hidden_{g.name}", (B, T, D)),
                    TensorSpec(f"centroids_{g.name}", (B, K, D)),
                    TensorSpec(f"init_{g.name}", (B, K), "int64"),
                    TensorSpec("warm", (1,)),
                    TensorSpec(PAIR, (1,)),
                ),
                (
                    TensorSpec(f"assign_{g.name}{STATE_SUFFIX}", (B, T), "int64"),
                    TensorSpec(f"centroids_{g.name}{STATE_SUFFIX}", (B, K, D)),
                    TensorSpec(f"dist_{g.name}{STATE_SUFFIX}", (B, T)),
                ),
            )
            graphs[f"select_{g.name}"] = GraphSpec(
                f"select_{g.name}",
                (
                    TensorSpec(f"assign_{g.name}", (B, T), "int64"),
                    TensorSpec(f"dist_{g.name}", (B, T)),
                    TensorSpec(f"key_{g.name}", (L, B, T)),
                    TensorSpec("dist_weight", (1,)),
                ),
                (TensorSpec(f"fresh_{g.name}{STATE_SUFFIX}", (L, B, K), "int64"),),
            )
        return graphs

    def state_tensors(self) -> dict[str, TensorSpec]:
        """Every tensor that lives in the engine between calls, by state name."""
        state: dict[str, TensorSpec] = {}
        for g in self.graphs.values():
            for t in g.outputs:
                if t.name != OUT:
                    state[t.state_name] = TensorSpec(t.state_name, t.shape, t.dtype)
        return state

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "options": asdict(self.options),
            "graph_batch": self.graph_batch,
            "output_shape": list(self.output_shape),
            "model_inputs": [asdict(t) for t in self.model_inputs],
            "cond_inputs": [asdict(t) for t in self.cond_inputs],
            "cond_tensors": [asdict(t) for t in self.cond_tensors],
            "slots": [asdict(s) for s in self.slots],
            "groups": [asdict(g) for g in self.groups],
            "graphs": {
                n: {"inputs": [asdict(t) for t in g.inputs], "outputs": [asdict(t) for t in g.outputs]}
                for n, g in self.graphs.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExportSpec":
        return make_spec(
            d["family"],
            BuildOptions(**d["options"]),
            [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d["model_inputs"]],
            [CacheSlot(**s) for s in d["slots"]],
            [TokenGroup(**g) for g in d["groups"]],
            d["graph_batch"],
            tuple(d["output_shape"]),
            [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d.get("cond_inputs", [])],
            [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d.get("cond_tensors", [])],
        )


def make_spec(
    family: str,
    options: BuildOptions,
    model_inputs: list[TensorSpec],
    slots: list[CacheSlot],
    groups: list[TokenGroup],
    graph_batch: int,
    output_shape: tuple[int, ...],
    cond_inputs: list[TensorSpec] = (),
    cond_tensors: list[TensorSpec] = (),
) -> ExportSpec:
    """Build an ``ExportSpec`` (the model output shape is needed before the graphs are named)."""
    for g in groups:
        if g.clusters > g.tokens:
            raise ConfigError(f"clusters must be <= the {g.tokens} {g.name} tokens, got {g.clusters}")
    for t in (*cond_inputs, *cond_tensors):
        if not t.shape or t.shape[0] != graph_batch:
            raise ConfigError(f"conditioning tensor {t.name}: expected [graph batch {graph_batch}, ...], got {list(t.shape)}")
    spec = ExportSpec(
        family, options, tuple(model_inputs), tuple(int(d) for d in output_shape), tuple(slots), tuple(groups),
        graph_batch, cond_inputs=tuple(cond_inputs), cond_tensors=tuple(cond_tensors),
    )
    object.__setattr__(spec, "graphs", spec._make_graphs())
    return spec
