"""Figures: each plot writes a readable PNG, labels state the signs, and no pyplot state leaks."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from matplotlib.text import Text

from inference.data import Dataset
from inference.errors import OptionError
from inference.plots import (
    pca_2d,
    plot_bound,
    plot_comparison,
    plot_latent_space,
    plot_reconstructions,
    plot_samples,
    plot_training_curves,
    save_figure,
    write_training_figures,
)
from models.vae import VAE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(epochs: int = 6) -> list[dict]:
    """Rows as :func:`inference.train.fit` writes them: ELBO rising, loss = -ELBO falling."""
    rows = []
    for e in range(1, epochs + 1):
        for split, offset in (("train", 0.0), ("test", 0.3)):
            recon, kl = -30.0 + 5.0 * (1 - np.exp(-e)) - offset, 2.0 + 0.5 * e
            row = {"epoch": e, "split": split, "reconstruction": recon, "kl": kl, "n": 100}
            row["elbo"] = recon - kl
            row["loss"] = -row["elbo"]
            if split == "train":
                row["svi_loss"] = row["loss"] + 0.1
            rows.append(row)
    return rows


def assert_png(path, min_bytes=2_000, max_bytes=200_000):
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert min_bytes < len(raw) < max_bytes
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture
def no_pyplot_leak():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def test_training_curves_label_loss_and_elbo_with_their_signs(tmp_path, no_pyplot_leak):
    path = tmp_path / "curves.png"
    fig = plot_training_curves(history(), title="vae on digits", path=path)
    assert_png(path)
    loss_ax, elbo_ax, recon_ax, kl_ax = fig.axes
    assert "loss = −ELBO" in loss_ax.get_ylabel() and "minimized" in loss_ax.get_title()
    assert loss_ax.get_ylabel().startswith("loss")
    assert elbo_ax.get_ylabel().startswith("ELBO") and "maximized" in elbo_ax.get_title()
    assert "log p(x|z)" in recon_ax.get_ylabel()
    assert "KL" in kl_ax.get_ylabel()
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert legend == ["train", "test", "svi.step(), epoch mean"]
    # the plotted ELBO is minus the plotted loss, point for point
    loss_train, elbo_train = loss_ax.get_lines()[0].get_ydata(), elbo_ax.get_lines()[0].get_ydata()
    np.testing.assert_allclose(elbo_train, -np.asarray(loss_train))


@pytest.mark.parametrize("epochs", [1, 5, 6])
def test_training_curves_mark_the_points_of_a_short_history(
    tmp_path, epochs, no_pyplot_leak, monkeypatch
):
    """A run of 8 epochs or fewer is evaluated once, at its end, by default: a line through
    one point draws nothing, so curves of at most FEW_POINTS evaluations mark every point (and
    the paper shows them); longer ones are lines only."""
    from inference.plots import FEW_POINTS

    fig = plot_training_curves(history(epochs), path=tmp_path / "curves.png")
    for ax in fig.axes:
        for line in ax.get_lines():
            assert len(line.get_xdata()) == epochs
            assert (line.get_marker() == "o") == (epochs <= FEW_POINTS), (ax.get_title(), epochs)
    if epochs == 1:  # its epoch is the one tick (not 0.84 ... 1.16)
        ticks = [t for t in fig.axes[0].get_xticks() if 0.5 <= t <= 1.5]
        assert ticks == [1.0]
    if epochs == 1:  # the markers reach the paper: without them the panels were blank

        def train_blue(path) -> int:  # the train series' colour (and its legend entries)
            pixels = imread(path)[..., :3]
            return int(((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)).sum())

        import inference.plots as plots

        monkeypatch.setattr(plots, "_few_marked", lambda epochs: {})
        plot_training_curves(history(epochs), path=tmp_path / "unmarked.png")
        marked, unmarked = (
            train_blue(tmp_path / "curves.png"),
            train_blue(tmp_path / "unmarked.png"),
        )
        assert marked - unmarked > 4 * 15, (marked, unmarked)  # a marker in each of 4 panels


def scaled_history(scale: float, shift: float = 0.0, first_epoch_factor: float = 1.0) -> list:
    """:func:`history` with every value ``v`` turned into ``scale * v + shift`` (the loss stays
    minus the ELBO), the first epoch's values multiplied by ``first_epoch_factor``."""
    rows = []
    for row in history(12):
        factor = first_epoch_factor if row["epoch"] == 1 else 1.0
        row = dict(row)
        for key in ("reconstruction", "kl"):
            row[key] = factor * (scale * row[key] + shift)
        row["elbo"] = row["reconstruction"] - row["kl"]
        row["loss"] = -row["elbo"]
        row["svi_loss"] = row["loss"] + 0.01 * abs(scale) if row["split"] == "train" else None
        rows.append(row)
    return rows


def drawn_text_boxes(fig) -> dict:
    """Every piece of text the last draw of ``fig`` put on the paper, with its window extent.

    Tick objects whose location lies outside the view keep a label that is not drawn: skipped.
    """
    renderer = fig.canvas.get_renderer()
    undrawn = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - tol <= tick.get_loc() <= hi + tol:
                    undrawn.update((tick.label1, tick.label2))
    return {
        text: text.get_window_extent(renderer)
        for text in fig.findobj(Text)
        if text.get_visible() and text.get_text() and text not in undrawn
    }


def assert_no_text_clipped_or_on_another_panel(fig):
    """No text reaches past the paper's edge, and no panel's text lies on another panel."""
    paper = fig.bbox
    boxes = drawn_text_boxes(fig)
    outside = {
        t.get_text(): tuple(np.round(b.extents, 1))
        for t, b in boxes.items()
        if b.x0 < paper.x0 or b.y0 < paper.y0 or b.x1 > paper.x1 or b.y1 > paper.y1
    }
    assert not outside, f"text clipped at the figure's edge ({paper.extents}): {outside}"
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    for text, box in boxes.items():
        if text.axes not in panels:  # figure text, or an inset's, which is drawn on its panel
            continue
        for ax in panels:
            if text.axes is not ax and box.overlaps(ax.bbox):
                raise AssertionError(f"{text.get_text()!r} lies on the panel {ax.get_title()!r}")


@pytest.mark.parametrize(
    "scale, shift, first_epoch_factor, title",
    [
        (1.0, 0.0, 1.0, "vae on digits"),
        (4300.0, 0.0, 1.0, "ELBO around -123456.7"),
        (-3.3e-5, 0.0, 1.0, "values around 0.001, ELBO positive"),
        (1.0, 27.0, 1.0, "crossing zero"),
        (-3.5e5, 0.0, 1.0, "ELBO around 1e7: an offset text above the panels"),
        (4300.0, 0.0, 40.0, "epoch 1 off scale: " + "a long title that must wrap, " * 6),
    ],
    ids=["elbo-23", "elbo-123456.7", "elbo+0.001", "crossing-zero", "elbo+1e7", "off-scale"],
)
def test_training_curves_text_stays_on_the_paper(tmp_path, scale, shift, first_epoch_factor, title):
    """Margins are measured, not fixed: tick labels as wide as "-0.001225" or "-148000", an
    offset "1e7", a two-line title and the "epoch 1 off scale" legend title all fit."""
    rows = scaled_history(scale, shift, first_epoch_factor)
    fig = plot_training_curves(rows, title=title, path=tmp_path / "curves.png")
    assert_no_text_clipped_or_on_another_panel(fig)
    if first_epoch_factor != 1.0:
        assert fig.axes[0].get_legend().get_title().get_text() == "epoch 1 off scale"


@pytest.mark.parametrize("xlabel", ["epoch", "step"])
def test_the_off_scale_note_names_the_first_evaluation(tmp_path, xlabel, no_pyplot_leak):
    """Evaluations are spaced (every 10 epochs on the default run): the first one left off
    scale is named by its own epoch or step, not as epoch 1."""
    rows = [
        {**r, "epoch": 10 * r["epoch"]}
        for r in scaled_history(4300.0, 0.0, first_epoch_factor=40.0)
    ]
    fig = plot_training_curves(rows, xlabel=xlabel)
    assert fig.axes[0].get_legend().get_title().get_text() == f"{xlabel} 10 off scale"


@pytest.mark.parametrize("latent_dim, spread", [(2, 1e-4), (2, 1234.5), (5, 1.0)])
def test_latent_space_text_stays_on_the_paper(tmp_path, latent_dim, spread):
    z = spread * torch.randn(60, latent_dim, generator=torch.Generator().manual_seed(0))
    fig = plot_latent_space(z, torch.arange(60) % 15, path=tmp_path / "latent.png")
    assert_no_text_clipped_or_on_another_panel(fig)
    legend = fig.axes[0].get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend.x1 <= fig.bbox.x1, "the legend beside the panel is cut off"


def _comparison(guides):
    from inference.compare import Comparison, ComparisonRow

    rows = tuple(
        ComparisonRow(
            guide=guide,
            split="test",
            n=10,
            elbo=-25.0,
            elbo_stderr=0.1,
            reconstruction=-25.0,
            kl=0.0,
            lk=-24.5,
            lk_stderr=0.05,
            gap=0.5,
            gap_stderr=0.11,
            khat_median=0.3,
            khat_share_bad=float("nan") if guide == "AutoDelta" else 0.0,
            ess_median=50.0,
            seconds=1.0,
            num_params=4,
            note="",
        )  # fmt: skip
        for guide in guides
    )
    return Comparison(rows, num_samples=100, train={}, model="vae")


def _bound_figure(path):
    rng = np.random.default_rng(0)
    elbo = rng.normal(-123456.7, 300.0, 200)
    exact = elbo + rng.gamma(2.0, 0.25, 200)
    return plot_bound(elbo, exact - 0.01, num_samples=100, exact_log_px=exact, title="t", path=path)


@pytest.mark.parametrize(
    "draw",
    [
        lambda p: plot_reconstructions(torch.rand(3, 64), torch.rand(3, 64), (8, 8), path=p),
        lambda p: plot_samples(torch.rand(3, 64), (8, 8), path=p),
        lambda p: plot_comparison(_comparison(["diag"]), p),
        lambda p: plot_comparison(_comparison(["diag", "AutoDelta", "full"]), p),
        _bound_figure,
    ],
    ids=["reconstructions-3", "samples-3", "comparison-1", "comparison-3", "bound"],
)
def test_narrow_figures_wrap_their_titles_instead_of_clipping_them(tmp_path, draw):
    assert_no_text_clipped_or_on_another_panel(draw(tmp_path / "figure.png"))


def test_training_curves_need_rows():
    with pytest.raises(OptionError, match="no train or test rows"):
        plot_training_curves([])


def test_reconstructions_put_inputs_above_outputs(tmp_path, no_pyplot_leak):
    x = (torch.rand(8, 64) > 0.5).double()
    path = tmp_path / "reconstructions.png"
    fig = plot_reconstructions(x, 0.5 * torch.ones(8, 64), (8, 8), path=path)
    assert_png(path, min_bytes=1_000)
    top, bottom = fig.axes
    assert top.get_ylabel() == "input" and bottom.get_ylabel().startswith("recon")
    # the top panel holds the inputs: ink where x = 1 (8 x 8 tiles, 1-pixel separators)
    tile = top.get_images()[0].get_array()[1:9, 1:9]
    np.testing.assert_array_equal(tile, x[0].reshape(8, 8).numpy())


def test_images_must_match_their_shape():
    with pytest.raises(OptionError, match=r"expected images of shape \(n, 8x8\)"):
        plot_samples(torch.rand(4, 63), (8, 8))
    with pytest.raises(OptionError, match="differ"):
        plot_reconstructions(torch.rand(4, 64), torch.rand(3, 64), (8, 8))


def test_samples_grid(tmp_path, no_pyplot_leak):
    path = tmp_path / "samples.png"
    plot_samples(torch.rand(25, 64), (8, 8), ncols=10, path=path)
    assert_png(path, min_bytes=1_000)


@pytest.mark.parametrize("latent_dim", [1, 2, 5], ids=["L1-index", "L2-scatter", "L5-pca"])
def test_latent_space(tmp_path, latent_dim, no_pyplot_leak):
    z = torch.randn(60, latent_dim)
    path = tmp_path / "latent.png"
    fig = plot_latent_space(z, torch.arange(60) % 10, path=path)
    assert_png(path)
    ax = fig.axes[0]
    expected = {1: "datum index", 2: "z_1", 5: "principal component 1"}[latent_dim]
    assert ax.get_xlabel().startswith(expected)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(d) for d in range(10)]


def test_pca_of_points_in_a_plane_keeps_their_distances():
    """Points on a 2-D plane in R^6: two components explain all variance, distances are kept."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    z = rng.normal(size=(50, 2)) @ basis.T + 3.0
    xy, explained = pca_2d(z)
    np.testing.assert_allclose(explained.sum(), 1.0, atol=1e-12)
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(xy), d(z), atol=1e-10)


def test_bound_picture_with_exact_evidence(tmp_path, no_pyplot_leak):
    rng = np.random.default_rng(0)
    elbo = rng.normal(-25.0, 3.0, 200)
    exact = elbo + rng.gamma(2.0, 0.25, 200)  # log p(x) - ELBO = KL(q || posterior) >= 0
    lk = exact - 0.01
    path = tmp_path / "bound.png"
    fig = plot_bound(elbo, lk, num_samples=1000, exact_log_px=exact, path=path)
    assert_png(path)
    scatter_ax, gap_ax = fig.axes
    assert "100% of points on or above" in scatter_ax.get_title()
    assert scatter_ax.get_xlabel().startswith("ELBO") and "L_1000" in scatter_ax.get_ylabel()
    legend = " ".join(t.get_text() for t in gap_ax.get_legend().get_texts())
    assert f"mean {(exact - elbo).mean():.3f}" in legend and "exact" in legend


def test_bound_picture_shapes_must_agree():
    with pytest.raises(OptionError, match="must be equal"):
        plot_bound(np.zeros(3), np.zeros(4))


def test_comparison_figure_puts_elbo_and_lk_with_two_standard_errors(tmp_path, no_pyplot_leak):
    import math

    from inference.compare import Comparison, ComparisonRow

    def row(guide, elbo, lk, share_bad):
        return ComparisonRow(
            guide=guide, split="test", n=10, elbo=elbo, elbo_stderr=0.1, reconstruction=elbo,
            kl=0.0, lk=lk, lk_stderr=0.05, gap=lk - elbo, gap_stderr=0.11, khat_median=0.3,
            khat_share_bad=share_bad, ess_median=50.0, seconds=1.0, num_params=4, note="",
        )  # fmt: skip

    rows = (row("diag", -25.0, -24.5, 0.0), row("AutoDelta", -20.0, -21.0, math.nan))
    comparison = Comparison(rows, num_samples=100, train={}, model="vae")
    path = tmp_path / "comparison.png"
    fig = plot_comparison(comparison, path)
    assert_png(path, min_bytes=1_000)
    (ax,) = fig.axes
    elbo, lk = ax.containers  # errorbar containers, in the order drawn
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ELBO", "L_K (K = 100)"]
    for container, values, stderr in ((elbo, [-25.0, -20.0], 0.1), (lk, [-24.5, -21.0], 0.05)):
        np.testing.assert_allclose(np.asarray(container.lines[0].get_ydata(), float), values)
        for segment, value in zip(container.lines[2][0].get_segments(), values, strict=True):
            np.testing.assert_allclose(segment[:, 1], [value - 2 * stderr, value + 2 * stderr])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["diag", "AutoDelta"]
    assert "AutoDelta: point estimate" in ax.get_title()


def test_save_figure_is_atomic_png(tmp_path):
    fig = plot_samples(torch.rand(4, 64), (8, 8))
    save_figure(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def _dataset(image_shape):
    x = (torch.rand(30, 64) > 0.5).double()
    labels = torch.arange(30) % 10
    return Dataset("toy", x[:20], x[20:], image_shape, labels[:20], labels[20:])


def test_run_figures_for_non_image_data_are_curves_only(tmp_path):
    vae = VAE(64, latent_dim=2, hidden_dims=(16,)).double()
    paths = write_training_figures(tmp_path, history(3), vae, _dataset(None))
    assert [p.name for p in paths] == ["curves.png"]


def test_train_and_explain_write_their_figures(tmp_path, capsys):
    """`elbo-lab train` writes curves/reconstructions/samples/latent; `explain` adds bound.png."""
    from inference.cli import main

    run = tmp_path / "run"
    args = ["train", "--epochs", "1", "--latent-dim", "2", "--hidden-dims", "8"]
    assert main([*args, "--no-progress", "--run-dir", str(run)]) == 0
    for name in ("curves", "reconstructions", "samples", "latent"):
        assert_png(run / f"{name}.png", min_bytes=1_000)
    assert main(["explain", str(run), "--num-samples", "8"]) == 0
    assert_png(run / "bound.png")
    capsys.readouterr()
