"""The compiled artifact: per-head program assignment, the program table, calibration figures.

``save_artifact`` / ``load_artifact`` (safetensors, schema ``dam.artifact/1``) live beside this
class; the loader validates everything and raises ``ArtifactError`` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .ir import (
    LAST_QUERY_QUERIES,
    ArtifactError,
    MaskProgram,
    check_block_size,
    check_fraction,
    check_positive_int,
)

SCHEMA = "dam.artifact/1"


@dataclass(frozen=True, eq=False)
class Artifact:
    """A compiled mask artifact for one model.

    Attributes:
        programs: the K distinct programs (the program table).
        head_program: int32 ``[L, H]``, index into ``programs`` per (layer, query head).
        block_size: the block size the programs were fitted at (the runtime's default).
        recall: float32 ``[L, H]``, calibration attention-mass recall of each head's program.
        density: float32 ``[L, H]``, calibration block density of each head's program.
        metadata: JSON-able dict: ``schema``, ``model`` fingerprint, ``calibration``,
            ``compile`` flags, ``tool_version``, and stage-specific extras.
        recall_capture: float32 ``[L, H]`` or None, recall on the exact mean map at the
            capture length P (``recall`` is on ``block_mass`` at the profiled length N).
    """

    programs: tuple[MaskProgram, ...]
    head_program: np.ndarray
    block_size: int
    recall: np.ndarray | None = None
    density: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    recall_capture: np.ndarray | None = None

    def __post_init__(self) -> None:
        progs = tuple(self.programs)
        if not progs or not all(isinstance(p, MaskProgram) for p in progs):
            raise ArtifactError("an artifact needs a non-empty tuple of MaskProgram")
        object.__setattr__(self, "programs", progs)
        hp = np.asarray(self.head_program)
        if hp.ndim != 2 or hp.size == 0 or not np.issubdtype(hp.dtype, np.integer):
            raise ArtifactError(f"head_program must be a non-empty int [L, H] array, got {hp.dtype} {hp.shape}")
        if hp.min() < 0 or hp.max() >= len(progs):
            raise ArtifactError(
                f"head_program indices must lie in [0, {len(progs)}), got [{hp.min()}, {hp.max()}]"
            )
        object.__setattr__(self, "head_program", hp.astype(np.int32))
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        for name in ("recall", "density", "recall_capture"):
            val = getattr(self, name)
            if val is None:
                continue
            arr = np.asarray(val, dtype=np.float32)
            if arr.shape != hp.shape:
                raise ArtifactError(f"{name} must have shape {hp.shape}, got {arr.shape}")
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1 + 1e-6:
                raise ArtifactError(f"{name} values must be finite and lie in [0, 1]")
            object.__setattr__(self, name, arr)

    @property
    def num_layers(self) -> int:
        return int(self.head_program.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.head_program.shape[1])

    def program_for(self, layer: int, head: int) -> MaskProgram:
        return self.programs[int(self.head_program[layer, head])]

    def runtime_defaults(self) -> tuple[float, int]:
        """``(last_query, last_query_queries)`` from ``metadata["runtime"]`` (``(0.0,
        LAST_QUERY_QUERIES)`` when absent), validated: :func:`runtime_defaults`."""
        return runtime_defaults(self.metadata)

    def sliding_windows(self) -> dict[int, int]:
        """``{layer: window}`` of the model's sliding-window layers (the fingerprint's
        ``layer_types``; empty for all-full models). Those layers run their exact band."""
        fp = self.metadata.get("model", {}) if isinstance(self.metadata, dict) else {}
        types = fp.get("layer_types") or ()
        return {i: int(fp["sliding_window"]) for i, t in enumerate(types) if t == "sliding_attention"}

    def select_heads(self, start: int, stop: int) -> Artifact:
        """The artifact restricted to query heads ``[start, stop)`` (what one tensor-parallel rank
        serves): the same programs and metadata, the per-head arrays' columns ``start:stop``."""
        H = self.num_heads
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))) \
                or not 0 <= start < stop <= H:
            raise ArtifactError(f"query heads [{start}, {stop}) are not a range of the artifact's {H}")
        if (start, stop) == (0, H):
            return self
        cols = slice(int(start), int(stop))

        def part(a):
            return None if a is None else np.ascontiguousarray(a[:, cols])

        return replace(self, head_program=part(self.head_program), recall=part(self.recall),
                                   density=part(self.density), recall_capture=part(self.recall_capture))

    def layer_programs(self, layer: int) -> tuple[MaskProgram, ...]:
        """The H programs of one layer, in query-head order."""
        return tuple(self.programs[int(k)] for k in self.head_program[layer])

    def check_compatible(self, config: Any) -> None:
        """Raise ArtifactError naming every mismatch between this artifact and a model config."""
        fp = self.metadata.get("model", {}) if isinstance(self.metadata, dict) else {}
        text_cfg = getattr(config, "get_text_config", lambda: config)()
        heads = getattr(text_cfg, "num_attention_heads", None)
        hidden = getattr(text_cfg, "hidden_size", None)
        head_dim = getattr(text_cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
        kv = getattr(text_cfg, "num_key_value_heads", None) or heads
        have = {
            "num_hidden_layers": getattr(text_cfg, "num_hidden_layers", None),
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
        }
        want = {
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": fp.get("num_key_value_heads"),
            "head_dim": fp.get("head_dim"),
        }
        bad = [
            f"{k}: artifact {want[k]} vs model {have[k]}"
            for k in want
            if want[k] is not None and have[k] is not None and int(want[k]) != int(have[k])
        ]
        want_layout = (fp.get("layer_types"), fp.get("sliding_window"))
        have_layout = _layer_layout(text_cfg)
        if tuple(want_layout) != have_layout:
            def show(t, w):
                if t is None:
                    return "every layer full attention"
                slide = [i for i, x in enumerate(t) if x == "sliding_attention"]
                return f"sliding-window ({w}) layers {slide}, the rest full"
            bad.append(f"attention layers: artifact {show(*want_layout)} vs model {show(*have_layout)}")
        if bad:
            name = fp.get("name_or_path", "?")
            raise ArtifactError(
                f"artifact (compiled for {name}) does not match this model: " + "; ".join(bad)
                + ". Compile an artifact from a profile of this model."
            )


def _layer_layout(text_cfg: Any) -> tuple[list[str] | None, int | None]:
    """``(layer_types, sliding_window)`` as a model fingerprint records them: ``(None, None)``
    when every layer is full attention (``dam.profiler.attention_layer_types`` is the full rule)."""
    L = getattr(text_cfg, "num_hidden_layers", None)
    types = getattr(text_cfg, "layer_types", None)
    window = getattr(text_cfg, "sliding_window", None)
    if types is None and window and getattr(text_cfg, "use_sliding_window", True) and L:
        types = ["sliding_attention"] * int(L)
    types = [str(t) for t in types] if types is not None else None
    if not types or all(t == "full_attention" for t in types):
        return None, None
    return types, int(window) if window else None


def runtime_defaults(metadata: Any) -> tuple[float, int]:
    """The run-time defaults an artifact's metadata carries (``"runtime"``: ``last_query`` in
    [0, 1], ``last_query_queries`` >= 1); ArtifactError when they are malformed."""
    rt = metadata.get("runtime", {}) if isinstance(metadata, dict) else {}
    if not isinstance(rt, dict):
        raise ArtifactError("metadata 'runtime' must be an object")
    return (check_fraction(rt.get("last_query", 0.0), "metadata runtime.last_query"),
            check_positive_int(rt.get("last_query_queries", LAST_QUERY_QUERIES), "metadata runtime.last_query_queries"))
