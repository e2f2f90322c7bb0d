"""Figures that show the sign convention: loss = -ELBO falls while the ELBO rises, and ELBO <= L_K.

Every function builds a fresh :class:`matplotlib.figure.Figure` (no pyplot, so no global figure
state and no display backend) and returns it; with ``path`` it also writes a PNG atomically
(:func:`inference.io.atomic_write_bytes`). Arrays may be numpy arrays or torch tensors. The
margins are measured once from the text around the panels (:func:`_fit_layout`), not by
constrained layout, which cost a default training run a third of its figure time.

- :func:`plot_training_curves`: loss = -ELBO (minimized) and ELBO (maximized), train and test,
  with E_q[log p(x|z)] and KL(q(z|x) || p(z)) in panels of their own (Kingma & Welling 2014, eq. 3).
- :func:`plot_reconstructions`, :func:`plot_samples`: images in, images out, images from the prior.
- :func:`plot_latent_space`: the guide's means, coloured by label (a 2-D PCA projection for L > 2).
- :func:`plot_bound`: per-datum ELBO against the importance-weighted bound L_K (Burda et al. 2016);
  log p(x) >= L_K >= ELBO puts every point above the diagonal. With the exact log p(x)
  (linear-Gaussian models) the exact gap KL(q(z|x) || p(z|x)) = log p(x) - ELBO is drawn too.
- :func:`plot_comparison`: ELBO and L_K of several guides (:func:`inference.compare.compare`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import OptionError
from .files import atomic_write_bytes

__all__ = [
    "pca_2d",
    "plot_bound",
    "plot_comparison",
    "plot_latent_space",
    "plot_reconstructions",
    "plot_samples",
    "plot_training_curves",
    "save_figure",
    "write_training_figures",
]

DPI = 100
SEPARATOR = "#9ec5e8"  # between tiled images: neither ink (black) nor paper (white)
SPLIT_STYLE = {"train": {"color": "C0", "ls": "-"}, "test": {"color": "C1", "ls": "--"}}
EDGE = 4 / 72  # inches of paper between the outermost text and the figure's edge
GAP = 12 / 72  # inches between one panel's text and the next panel
# zlib level: encodes ~30% faster than PIL's default 6 (about 9 ms over a run's four figures);
# files are 3-13% larger
PNG_COMPRESS_LEVEL = 3


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> None:
    """Render ``fig`` to PNG in memory and write it to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    atomic_write_bytes(path, buf.getvalue())


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: the text measured for the layout is measured once, by
    the renderer that later draws it (a figure without a canvas gets a new one, and a new
    renderer, at every save)."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


# --- layout ------------------------------------------------------------------------------------


def _fit_layout(fig: Figure, *, suptitle=None, outside: Sequence[Any] = ()) -> None:
    """Set the subplot margins, in inches, to the text around the panels: a one-pass layout.

    Constrained layout finds margins by measuring every artist's extent, in two rounds, and
    then draws the figure an extra time: about 0.1 s of the training curves' 0.25 s. Here only
    the text outside the panels is measured (tick labels, whose width follows the values'
    magnitude; axis labels; titles; offset texts such as "1e7"; the artists in ``outside``,
    e.g. a legend beside its panel), and the margins are those extents plus :data:`EDGE` at
    the figure's edge and :data:`GAP` between panels. Tick labels depend on the panels' size,
    so the margins are measured again until they stop growing (twice, nearly always).

    A ``suptitle`` or a panel title wider than the figure is broken into lines; the suptitle
    sits :data:`EDGE` below the top.
    """
    renderer = fig.canvas.get_renderer()
    width, height = fig.get_size_inches()
    edge_px = EDGE * fig.dpi
    top_band = 0.0
    if suptitle is not None:
        _wrap_to(suptitle, suptitle.get_text(), renderer, fig.bbox.width - 2 * edge_px)
        suptitle.set_y(1 - EDGE / height)
        top_band = suptitle.get_window_extent(renderer).height / fig.dpi + GAP / 2
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    if not panels:
        return
    nrows, ncols = panels[0].get_subplotspec().get_gridspec().get_geometry()
    rows = {ax: ax.get_subplotspec().rowspan for ax in panels}
    cols = {ax: ax.get_subplotspec().colspan for ax in panels}
    titles = {ax: ax.title.get_text() for ax in panels}

    def most(values) -> float:
        return max(values, default=0.0)

    # left, bottom, right, top, then the space between columns and between rows (inches)
    margins = np.zeros(6)
    for _ in range(4):
        for ax, title in titles.items():
            centre = (ax.bbox.x0 + ax.bbox.x1) / 2
            room = 2 * min(centre, fig.bbox.width - centre) - 2 * edge_px
            _wrap_to(ax.title, title, renderer, room)
        reach = {ax: _reach(ax, renderer, outside) / fig.dpi for ax in panels}
        needed = np.array(
            [
                EDGE + most(reach[ax][0] for ax in panels if cols[ax].start == 0),
                EDGE + most(reach[ax][1] for ax in panels if rows[ax].stop == nrows),
                EDGE + most(reach[ax][2] for ax in panels if cols[ax].stop == ncols),
                EDGE + top_band + most(reach[ax][3] for ax in panels if rows[ax].start == 0),
                GAP
                + most(
                    most(reach[ax][2] for ax in panels if cols[ax].stop == c)
                    + most(reach[ax][0] for ax in panels if cols[ax].start == c)
                    for c in range(1, ncols)
                ),
                GAP
                + most(
                    most(reach[ax][1] for ax in panels if rows[ax].stop == r)
                    + most(reach[ax][3] for ax in panels if rows[ax].start == r)
                    for r in range(1, nrows)
                ),
            ]
        )
        if np.all(needed <= margins):
            return
        margins = np.maximum(margins, needed)
        left, bottom, right, top, wspace, hspace = margins
        panel_width = (width - left - right - (ncols - 1) * wspace) / ncols
        panel_height = (height - bottom - top - (nrows - 1) * hspace) / nrows
        if panel_width <= 0 or panel_height <= 0:
            return  # the text alone is larger than the figure: keep the last layout
        fig.subplots_adjust(
            left=left / width,
            right=1 - right / width,
            bottom=bottom / height,
            top=1 - top / height,
            wspace=wspace / panel_width,
            hspace=hspace / panel_height,
        )


def _reach(ax, renderer, outside: Sequence[Any]) -> np.ndarray:
    """How far the text around ``ax`` reaches beyond its panel: (left, bottom, right, top) pixels.

    Tick labels, the title and the ``outside`` artists drawn in ``ax`` are measured where they
    stand. Axis labels and offset texts are placed only when the figure is drawn, so their
    reach is composed the way matplotlib places them: an axis label ``labelpad`` points beyond
    the tick labels, an offset text 3 points beyond them (``Axis.OFFSETTEXTPAD``), and a title
    raised above a y offset text that it would overlap.
    """
    box = ax.bbox
    pt = renderer.points_to_pixels(1.0)

    def beyond(bb) -> np.ndarray:
        return np.array([box.x0 - bb.x0, box.y0 - bb.y0, bb.x1 - box.x1, bb.y1 - box.y1])

    def tick_reach(axis, along: int) -> np.ndarray:
        reach = np.zeros(4)
        for label in axis.get_ticklabels():
            if not label.get_text():
                continue
            bb = label.get_window_extent(renderer)
            lo, hi = (box.x0, box.x1) if along == 0 else (box.y0, box.y1)
            centre = (bb.x0 + bb.x1) / 2 if along == 0 else (bb.y0 + bb.y1) / 2
            if lo - 1 <= centre <= hi + 1:  # ticks outside the view keep stale, undrawn labels
                reach = np.maximum(reach, beyond(bb))
        return reach

    def offset_height(axis) -> float:
        offset, text = axis.get_offset_text(), axis.get_major_formatter().get_offset()
        if not (offset.get_visible() and text):
            return 0.0
        offset.set_text(text)  # what drawing sets it to, measured now
        return 3 * pt + offset.get_window_extent(renderer).height

    x_ticks, y_ticks = tick_reach(ax.xaxis, 0), tick_reach(ax.yaxis, 1)
    reach = np.maximum(np.maximum(x_ticks, y_ticks), 0.0)
    bottom = x_ticks[1] + offset_height(ax.xaxis)
    xlabel, ylabel = ax.xaxis.label, ax.yaxis.label
    if xlabel.get_visible() and xlabel.get_text():
        bb = xlabel.get_window_extent(renderer)
        bottom = max(bottom, x_ticks[1] + ax.xaxis.labelpad * pt + bb.height)
        reach[[0, 2]] = np.maximum(reach[[0, 2]], (bb.width - box.width) / 2)
    reach[1] = max(reach[1], bottom)
    if ylabel.get_visible() and ylabel.get_text():
        bb = ylabel.get_window_extent(renderer)
        reach[0] = max(reach[0], y_ticks[0] + ax.yaxis.labelpad * pt + bb.width)
        reach[[1, 3]] = np.maximum(reach[[1, 3]], (bb.height - box.height) / 2)
    y_offset = offset_height(ax.yaxis)
    reach[3] = max(reach[3], y_offset)
    if ax.title.get_visible() and ax.title.get_text():
        title = beyond(ax.title.get_window_extent(renderer))
        title[3] += y_offset
        reach = np.maximum(reach, title)
    for artist in outside:
        if artist.axes is ax:
            reach = np.maximum(reach, beyond(artist.get_window_extent(renderer)))
    return reach


def _wrap_to(text, words: str, renderer, width_px: float) -> None:
    """Set ``text`` to ``words``, broken into lines at spaces where it is wider than ``width_px``."""
    text.set_text(words)
    if not words or text.get_window_extent(renderer).width <= width_px:
        return
    lines: list[str] = []
    for word in words.split(" "):
        if lines:
            text.set_text(f"{lines[-1]} {word}")
            if text.get_window_extent(renderer).width <= width_px:
                lines[-1] = f"{lines[-1]} {word}"
                continue
        lines.append(word)
    text.set_text("\n".join(lines))


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _numpy(a: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor (detached, on the CPU)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


# --- training curves ---------------------------------------------------------------------------


def _series(history: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list, list]:
    rows = [r for r in history if r.get("split") == split and r.get(key) not in (None, "")]
    return [int(r["epoch"]) for r in rows], [float(r[key]) for r in rows]


#: Curves of at most this many evaluations mark each one: a short run is evaluated a few times
#: (once, at its end, when it is 8 epochs or shorter), and a line through one point is not drawn.
FEW_POINTS = 5


def _few_marked(epochs: list) -> dict:
    """A marker per point for a series of at most :data:`FEW_POINTS` points."""
    return {"marker": "o", "ms": 5} if len(epochs) <= FEW_POINTS else {}


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    xlabel: str = "epoch",
    unit: str = "nats/datum",
) -> Figure:
    """Four panels from :func:`inference.train.fit`'s history rows (per datum, in nats).

    Top: ``loss = -ELBO`` (what SVI minimized, with the running mean of the step losses on the
    training mini-batches) and ``ELBO`` (what the VAE maximizes). Bottom: the two terms of
    ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)). Train solid, test dashed.

    Args:
        history: rows with ``epoch``, ``split`` ("train"/"test"), ``loss``, ``elbo``,
            ``reconstruction``, ``kl`` and, for train rows, optionally ``svi_loss``.
        title: a suptitle, e.g. the model and data.
        path: write the PNG here as well.
        xlabel: what ``epoch`` counts (``"step"`` for :mod:`inference.watch`'s rows, whose
            ``svi_loss`` is the mean of the steps since the previous row).
        unit: the values' unit (``"nats"`` for whole-objective totals, as watch records).
    """
    if not any(r.get("split") in SPLIT_STYLE for r in history):
        raise OptionError("plot_training_curves: the history has no train or test rows")
    fig = _figure((10, 7))
    axes = fig.subplots(2, 2, sharex=True)
    panels = [
        (axes[0, 0], "loss", f"loss = −ELBO  ({unit})", "loss = −ELBO: minimized by SVI  ↓"),
        (axes[0, 1], "elbo", f"ELBO  ({unit})", "ELBO = E[log p(x|z)] − KL: maximized  ↑"),
        (
            axes[1, 0],
            "reconstruction",
            f"E_q[log p(x|z)]  ({unit})",
            "reconstruction E_q[log p(x|z)]: maximized  ↑",
        ),
        (
            axes[1, 1],
            "kl",
            f"KL(q(z|x) ‖ p(z))  ({unit})",
            "KL(q(z|x) ‖ p(z)) ≥ 0: subtracted from the ELBO",
        ),
    ]
    for ax, key, ylabel, heading in panels:
        for split, style in SPLIT_STYLE.items():
            epochs, values = _series(history, split, key)
            if epochs:
                ax.plot(epochs, values, label=split, lw=1.6, **style, **_few_marked(epochs))
        if key == "loss":
            epochs, values = _series(history, "train", "svi_loss")
            if epochs:
                label = "svi.step(), epoch mean" if xlabel == "epoch" else "svi.step(), mean"
                marks = _few_marked(epochs)
                ax.plot(epochs, values, color="0.5", ls=":", lw=1.4, label=label, **marks)
        ax.set_ylabel(ylabel)
        ax.set_title(heading, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, frameon=False)
    for ax in axes.flat:
        _zoom_to_tail(ax, xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = {float(x) for line in ax.get_lines() for x in line.get_xdata()}
        if len(xs) == 1:  # one evaluation: a view one epoch wide, its epoch the one tick
            (x,) = xs
            ax.set_xlim(x - 0.5, x + 0.5)
            ax.set_xticks([x])
    for ax in axes[1]:
        ax.set_xlabel(xlabel)
    _fit_layout(fig, suptitle=fig.suptitle(title) if title else None)
    return _finish(fig, path)


def _zoom_to_tail(ax, xlabel: str = "epoch") -> None:
    """Leave the first evaluation off scale when it lies far outside the rest, so the rest is
    readable.

    "Far" means more than three times the later values' range beyond it; the panel then
    says so in its legend title, naming that evaluation's epoch (or step), which is not
    epoch 1 when evaluations are spaced.
    """
    lines = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    first = np.concatenate([y[:1] for y in lines])
    rest = np.concatenate([y[1:] for y in lines])
    rest = rest[np.isfinite(rest)]
    if rest.size < 2:
        return
    lo, hi = rest.min(), rest.max()
    width = max(hi - lo, 1e-9)
    if np.all((first >= lo - 3 * width) & (first <= hi + 3 * width)):
        return
    ax.set_ylim(lo - 0.05 * width, hi + 0.05 * width)
    first_x = min(float(line.get_xdata()[0]) for line in ax.get_lines() if len(line.get_xdata()))
    ax.get_legend().set_title(f"{xlabel} {first_x:g} off scale", prop={"size": 8})


# --- images ------------------------------------------------------------------------------------


def _image_grid(ax, images: np.ndarray, image_shape: tuple[int, int], ncols: int) -> None:
    """Tile ``images`` ``(n, H*W)`` into one array separated by coloured one-pixel lines; show it."""
    from matplotlib import colormaps

    h, w = image_shape
    n = images.shape[0]
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1), np.nan)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[
            i
        ].reshape(h, w)
    cmap = colormaps["gray_r"].with_extremes(bad=SEPARATOR)
    ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _check_images(name: str, images: np.ndarray, image_shape: Sequence[int]) -> tuple[int, int]:
    if (
        images.ndim != 2
        or len(image_shape) != 2
        or images.shape[1] != image_shape[0] * image_shape[1]
    ):
        raise OptionError(
            f"{name}: expected images of shape (n, {'x'.join(map(str, image_shape))}) "
            f"flattened, got {tuple(images.shape)}"
        )
    return int(image_shape[0]), int(image_shape[1])


def plot_reconstructions(
    x: Any,
    x_hat: Any,
    image_shape: Sequence[int],
    *,
    title: str | None = "inputs x (top) and reconstructions E[x | z = z_loc(x)] (bottom)",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Inputs ``x`` ``(n, H*W)`` in the top row, their reconstructions ``x_hat`` below.

    ``x_hat`` is typically the decoder's Bernoulli mean at the guide's mean,
    sigmoid(decoder(z_loc(x))) (:meth:`models.vae.VAE.reconstruct`), in [0, 1].
    """
    x, x_hat = _numpy(x), _numpy(x_hat)
    shape = _check_images("plot_reconstructions", x, image_shape)
    _check_images("plot_reconstructions", x_hat, image_shape)
    if x.shape != x_hat.shape:
        raise OptionError(
            f"plot_reconstructions: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ"
        )
    n = x.shape[0]
    fig = _figure((max(4.0, 0.8 * n), 2.2))
    top, bottom = fig.subplots(2, 1)
    _image_grid(top, x, shape, n)
    _image_grid(bottom, x_hat, shape, n)
    top.set_ylabel("input", fontsize=10)
    bottom.set_ylabel("recon.", fontsize=10)
    _fit_layout(fig, suptitle=fig.suptitle(title, fontsize=10) if title else None)
    return _finish(fig, path)


def plot_samples(
    samples: Any,
    image_shape: Sequence[int],
    *,
    ncols: int = 10,
    title: str | None = "samples from the prior: E[x | z], z ~ N(0, I)",
    path: str | os.PathLike | None = None,
) -> Figure:
    """A grid of images ``(n, H*W)`` in [0, 1], e.g. decoder means of prior draws."""
    samples = _numpy(samples)
    shape = _check_images("plot_samples", samples, image_shape)
    ncols = min(ncols, samples.shape[0])
    nrows = math.ceil(samples.shape[0] / ncols)
    fig = _figure((0.6 * ncols + 0.4, 0.6 * nrows + 0.5))
    ax = fig.subplots()
    _image_grid(ax, samples, shape, ncols)
    if title:
        ax.set_title(title, fontsize=10)
    _fit_layout(fig)
    return _finish(fig, path)


# --- latent space ------------------------------------------------------------------------------


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ``z`` ``(n, L)`` on its two leading principal axes.

    Returns the projection ``(n, 2)`` and the share of variance each axis explains ``(2,)``.
    """
    zc = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    explained = s**2 / max(float(np.sum(s**2)), np.finfo(float).tiny)
    return zc @ vt[:2].T, explained[:2]


def plot_latent_space(
    z: Any,
    labels: Any | None = None,
    *,
    title: str | None = "latent space: guide means z_loc(x)",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Scatter the guide's means ``z`` ``(n, L)``, coloured by ``labels`` ``(n,)`` when given.

    For L = 2 the axes are z_1 and z_2; for L > 2 the points are projected on their two leading
    principal components (the axis labels give the share of variance), for L = 1 against index.
    """
    z = _numpy(z)
    if z.ndim != 2 or z.shape[0] == 0:
        raise OptionError(f"plot_latent_space: expected z of shape (n, L), got {tuple(z.shape)}")
    fig = _figure((6.0, 5.0))
    ax = fig.subplots()
    if z.shape[1] == 1:
        xy = np.column_stack([np.arange(len(z)), z[:, 0]])
        xlabel, ylabel = "datum index", "z_1"
    elif z.shape[1] == 2:
        xy, xlabel, ylabel = z, "z_1", "z_2"
    else:
        xy, explained = pca_2d(z)
        xlabel = f"principal component 1 ({100 * explained[0]:.0f}% of variance)"
        ylabel = f"principal component 2 ({100 * explained[1]:.0f}% of variance)"
        title = f"{title} (L = {z.shape[1]}, PCA)" if title else title
    legend = None
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=10, alpha=0.7, color="C0")
    else:
        labels = np.asarray(_numpy(labels), dtype=np.int64)
        classes = np.unique(labels)
        cmap = _label_colors(len(classes))
        for color, c in zip(cmap, classes, strict=True):
            keep = labels == c
            ax.scatter(xy[keep, 0], xy[keep, 1], s=10, alpha=0.75, color=color, label=str(c))
        legend = ax.legend(
            title="label",
            fontsize=8,
            title_fontsize=9,
            markerscale=1.8,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=11)
    _fit_layout(fig, outside=[legend] if legend is not None else ())
    return _finish(fig, path)


def _label_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --- the bound ---------------------------------------------------------------------------------


def _zoom_inset(ax, elbo: np.ndarray, ys: list[np.ndarray], lims: tuple[float, float]) -> None:
    """Magnify a window around the median datum, so a gap small against the data's spread shows.

    The window is square, from two median gaps below the median ELBO to four above (at least 1.5% of
    the full range); it is drawn only when the gap is under a tenth of the full range.
    """
    gap = float(np.median(np.abs(ys[0] - elbo)))
    full = lims[1] - lims[0]
    if not gap < 0.1 * full:
        return
    centre = float(np.median(elbo))
    half = max(2 * gap, 0.005 * full)
    window = (centre - half, centre + 2 * half)
    inset = ax.inset_axes((0.56, 0.05, 0.42, 0.42), xlim=window, ylim=window)
    inset.plot(window, window, color="0.3", lw=1)
    markers = ("o", "x")
    colors = ("C0", "C3")
    for y, marker, color in zip(ys, markers, colors, strict=False):
        inset.scatter(elbo, y, s=12, alpha=0.7, color=color, marker=marker)
    inset.set_aspect("equal")
    inset.tick_params(labelsize=7)
    inset.xaxis.set_major_locator(MaxNLocator(3))
    inset.yaxis.set_major_locator(MaxNLocator(3))
    inset.set_title("zoom", fontsize=8, pad=2)
    ax.indicate_inset_zoom(inset, edgecolor="0.4")


def plot_bound(
    elbo: Any,
    lk: Any,
    *,
    num_samples: int | None = None,
    exact_log_px: Any | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Per-datum ELBO against the importance-weighted bound L_K, and the gap between them.

    Left: each datum is a point (ELBO_n, L_K,n); since log p(x_n) >= L_K,n >= ELBO_n in
    expectation (Burda et al. 2016), points lie above the diagonal y = x. Right: histogram of
    the estimated gap L_K,n - ELBO_n ~ KL(q(z|x_n) || p(z|x_n)). With ``exact_log_px`` the exact
    log p(x_n) is drawn against the ELBO too, and the exact gap log p(x_n) - ELBO_n (Kingma &
    Welling 2014, eq. 1) beside the estimated one.

    Args:
        elbo: per-datum ELBO ``(N,)`` in nats.
        lk: per-datum L_K ``(N,)``, the K-sample importance-weighted bound (e.g.
            ``EvidenceEstimate.per_datum``).
        num_samples: K, for the labels.
        exact_log_px: per-datum exact log p(x) ``(N,)``, when the model has one.
    """
    elbo, lk = _numpy(elbo).reshape(-1), _numpy(lk).reshape(-1)
    if elbo.shape != lk.shape or elbo.size == 0:
        raise OptionError(
            f"plot_bound: elbo {tuple(elbo.shape)} and L_K {tuple(lk.shape)} must be equal, non-empty"
        )
    exact = None if exact_log_px is None else _numpy(exact_log_px).reshape(-1)
    if exact is not None and exact.shape != elbo.shape:
        raise OptionError(
            f"plot_bound: exact log p(x) {tuple(exact.shape)} and elbo {tuple(elbo.shape)} differ"
        )
    k = f"L_{num_samples}" if num_samples else "L_K"
    fig = _figure((11, 4.6))
    left, right = fig.subplots(1, 2, width_ratios=(1.1, 1.0))

    ys = [lk] if exact is None else [lk, exact]
    lo = min(elbo.min(), *(y.min() for y in ys))
    hi = max(elbo.max(), *(y.max() for y in ys))
    pad = 0.03 * max(hi - lo, 1e-9)
    lims = (lo - pad, hi + pad)
    left.plot(lims, lims, color="0.3", lw=1, label="y = ELBO (no gap)")
    left.scatter(elbo, lk, s=9, alpha=0.6, color="C0", label=f"{k} (importance-weighted)")
    if exact is not None:
        left.scatter(elbo, exact, s=9, alpha=0.6, color="C3", marker="x", label="exact log p(x)")
    left.set_xlim(lims)
    left.set_ylim(lims)
    left.set_aspect("equal")
    left.set_xlabel("ELBO per datum (nats)")
    left.set_ylabel(f"{k} ≈ log p(x) per datum (nats)")
    share = float(np.mean(lk >= elbo))
    left.set_title(
        f"log p(x) ≥ {k} ≥ ELBO: {100 * share:.0f}% of points on or above y = x", fontsize=10
    )
    left.grid(alpha=0.3)
    left.legend(fontsize=9, loc="upper left")
    _zoom_inset(left, elbo, ys, lims)

    gaps = [(lk - elbo, "C0", f"{k} − ELBO (estimated)")]
    if exact is not None:
        gaps.append((exact - elbo, "C3", "log p(x) − ELBO (exact)"))
    all_gaps = np.concatenate([g for g, _, _ in gaps])
    bins = np.linspace(min(0.0, all_gaps.min()), all_gaps.max() + 1e-9, 40)
    for gap, color, label in gaps:
        right.hist(gap, bins=bins, color=color, alpha=0.55, label=f"{label}: mean {gap.mean():.3f}")
    right.axvline(0.0, color="0.3", lw=1)
    right.set_xlabel("gap per datum (nats) ≈ KL(q(z|x) ‖ p(z|x)) ≥ 0")
    right.set_ylabel("number of data points")
    right.set_title("the gap the ELBO leaves below log p(x)", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=9)
    _fit_layout(fig, suptitle=fig.suptitle(title) if title else None)
    return _finish(fig, path)


def plot_comparison(comparison: Any, path: str | os.PathLike | None = None) -> Figure:
    """ELBO and L_K per guide with ±2 standard-error bars (nats per datum).

    ``comparison``: an :class:`inference.compare.Comparison` (typed loosely: ``compare`` imports
    this module). ELBO <= L_K <= log p(x) holds for every guide that is not a point mass.
    """
    rows = comparison.rows
    fig = _figure((1.6 + 1.3 * len(rows), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(rows))
    for offset, key, label, marker in (
        (-0.1, "elbo", "ELBO", "o"),
        (0.1, "lk", f"L_K (K = {comparison.num_samples})", "s"),
    ):
        values = [getattr(r, key) for r in rows]
        errors = [2 * getattr(r, f"{key}_stderr") for r in rows]
        ax.errorbar(xs + offset, values, yerr=errors, fmt=marker, capsize=4, label=label)
    ax.set_xticks(xs, [r.guide for r in rows])
    ax.set_ylabel(comparison.units if len(comparison.units) < 30 else "nats")
    title = f"{comparison.model or 'model'}: ELBO ≤ L_K ≤ log p(x), ±2 s.e."
    points = [r.guide for r in rows if math.isnan(r.khat_share_bad)]  # k̂ undefined: point mass
    if points:
        title += f"\n({', '.join(points)}: point estimate, its values are not bounds)"
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    _fit_layout(fig)
    return _finish(fig, path)


# --- a run's figures ---------------------------------------------------------------------------


def write_training_figures(
    run_dir: str | os.PathLike,
    history: Sequence[Mapping[str, Any]],
    module: Any,
    data: Any,
    **options: Any,
) -> list[Path]:
    """Write a trained run's figures into ``run_dir`` and return their paths: the figures of
    :func:`inference.figure_worker.training_figure_jobs` (which says which, and takes the
    ``options``: ``num_images``, ``num_samples``, ``seed``, ``title``), drawn in this process.

    Args:
        history: :attr:`inference.train.TrainResult.history`.
        module: the trained model's ``nn.Module``.
        data: an :class:`inference.data.Dataset` on the module's device and dtype.
    """
    from .figure_worker import draw, training_figure_jobs

    return draw(training_figure_jobs(run_dir, history, module, data, **options))
