"""A PNG of what an artifact keeps: per head, its block mask beside the profiled attention map.

matplotlib is imported inside ``plot_artifact`` (only ``dam inspect --plot`` needs it).
"""

from __future__ import annotations

import numpy as np

from .artifact import Artifact
from .ir import ArtifactError
from .profile import Profile
from .report import describe_program


def plot_artifact(
    art: Artifact, path: str, profile: Profile | None = None, length: int | None = None,
    layers: list[int] | None = None,
) -> None:
    """Write ``path`` (PNG): a row per layer; per head the block mask at ``length`` (kept = dark,
    dense heads grey) and, with ``profile``, its ``block_mass`` on a log colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = art.num_layers, art.num_heads
    layers = list(range(L)) if layers is None else layers
    bad = [x for x in layers if not 0 <= x < L]
    if bad or not layers:
        raise ArtifactError(f"layers {bad or layers} out of range 0..{L - 1}")
    if profile is not None and (profile.num_layers, profile.num_heads) != (L, H):
        raise ArtifactError("the profile's layers x heads differ from the artifact's")
    B = profile.block_size if profile is not None else art.block_size
    n = length or (profile.length if profile is not None else
                   int((art.metadata.get("figures", {}) or {}).get("target_length") or 2048))
    per = 2 if profile is not None else 1
    cols = H * per
    fig, axes = plt.subplots(len(layers), cols, figsize=(1.6 * cols, 1.75 * len(layers) + 0.6),
                             squeeze=False)
    cache: dict = {}
    for r, layer in enumerate(layers):
        for h in range(H):
            p = art.program_for(layer, h)
            if p not in cache:
                full = p.block_mask(n, n, B).astype(float)
                cache[p] = np.where(np.tril(np.ones_like(full)) > 0, full, np.nan)
            ax = axes[r, h * per]
            ax.imshow(cache[p], cmap="Greys" if not p.dense else "Greys_r", vmin=0, vmax=1.5,
                      interpolation="nearest")
            dens = p.density(n, n, B)
            ax.set_title(f"L{layer}H{h} d={dens:.2f}\n{describe_program(p, 2)[:34]}", fontsize=5)
            ax.set_xticks([])
            ax.set_yticks([])
            if profile is not None:
                ax2 = axes[r, h * per + 1]
                bm = profile.block_mass[layer, h]
                with np.errstate(divide="ignore"):
                    img = np.log10(np.where(np.tril(np.ones_like(bm)) > 0, bm, np.nan) + 1e-9)
                ax2.imshow(img, cmap="magma", vmin=-7, interpolation="nearest")
                ax2.set_title(f"mass N={profile.length}", fontsize=5)
                ax2.set_xticks([])
                ax2.set_yticks([])
    fig.suptitle(f"block masks at N={n} (B={B}); kept = dark" +
                 ("; right: profiled block_mass (log10)" if profile is not None else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
