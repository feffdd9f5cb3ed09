"""The plots: drawn without pyplot or a backend switch; a loss plot that shows what was logged; speed vs quality."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aletheia_lora import plots
from aletheia_lora.select import Selection, make_selection

SCORES = {0: 9.0, 1: 5.0, 2: 4.0, 3: 3.5, 4: 3.0, 5: 2.0, 6: 1.5, 7: 1.0}


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, in order (nothing is written)."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def _lines(fig) -> dict:
    """Every line and point series of the figure's axes by its legend label: (xs, ys)."""
    ax = fig.axes[0]
    found = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    for collection in ax.collections:
        offsets = collection.get_offsets()
        found[collection.get_label()] = ([float(x) for x, _ in offsets], [float(y) for _, y in offsets])
    return found


def _legend(fig) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


# --- no backend switch, no pyplot state ----------------------------------------------------------------------------


def test_plotting_keeps_the_callers_backend_and_never_touches_pyplot(tmp_path):
    """A notebook's backend stays as it was: every plot function run after choosing a non-Agg backend."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
from aletheia_lora import plots
from aletheia_lora.select import make_selection
out = {str(tmp_path)!r}
plots.plot_layer_scores({{0: 1.0, 1: 2.0}}, [1], out + "/a.png")
plots.plot_loss_curves([{{"loss": 2.0, "step": 1}}, {{"eval_loss": 1.9, "step": 1}}], out + "/b.png",
                       eval_loss_before=2.1)
plots.plot_speed_quality(make_selection({SCORES!r}, strategy="truncation"), out + "/c.png")
plots.plot_reprobe_history([{{"step": 0, "layers": [1]}}], 2, out + "/d.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "False"]
    for name in "abcd":
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_no_pyplot_figure_is_left_open(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt  # a caller that uses pyplot itself

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    plots.plot_layer_scores({0: 1.0, 1: 2.0}, [0], tmp_path / "s.png")
    plots.plot_loss_curves([{"loss": 2.0, "step": 5}], tmp_path / "l.png")
    plots.plot_speed_quality(make_selection(SCORES), tmp_path / "q.png")
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend


# --- the loss plot -------------------------------------------------------------------------------------------------

HISTORY = [
    {"loss": 2.8, "learning_rate": 3e-4, "step": 10},
    {"eval_loss": 2.7, "eval_runtime": 0.1, "step": 10},
    {"loss": 2.6, "learning_rate": 3e-4, "step": 20},
    {"eval_loss": 2.55, "eval_runtime": 0.1, "step": 20},
    {"train_loss": 2.7, "train_runtime": 9.0, "step": 20},
]


def test_loss_plot_shows_train_held_out_and_before_training_on_one_axis(drawn, tmp_path):
    plots.plot_loss_curves(HISTORY, tmp_path / "loss.png", title="llama: LoRA on 4 layers", eval_loss_before=3.0)
    (fig,) = drawn
    assert len(fig.axes) == 1
    lines = _lines(fig)
    assert lines["train loss (logged steps)"] == ([10, 20], [2.8, 2.6])
    assert lines["held-out loss"] == ([0, 10, 20], [3.0, 2.7, 2.55])
    assert lines["before training"] == ([0], [3.0])
    assert _legend(fig) == ["train loss (logged steps)", "held-out loss", "before training"]
    assert fig.axes[0].get_title() == "llama: LoRA on 4 layers"  # everything there: no note


def test_loss_plot_with_fewer_steps_than_logging_steps_shows_the_mean_and_says_so(drawn, tmp_path):
    """4 steps with --logging-steps 10: the Trainer logs no step's loss, only the run's mean at the end."""
    history = [{"eval_loss": 2.9, "step": 4}, {"train_loss": 3.05, "train_runtime": 2.0, "step": 4}]
    plots.plot_loss_curves(history, tmp_path / "loss.png", title="Training", eval_loss_before=3.1)
    (fig,) = drawn
    lines = _lines(fig)
    assert lines["train loss (mean over the run)"] == ([4], [3.05])
    assert lines["held-out loss"] == ([0, 4], [3.1, 2.9])
    title = fig.axes[0].get_title()
    assert (
        title.startswith("Training\n") and "no per-step train loss logged (fewer steps than --logging-steps)" in title
    )


def test_loss_plot_adds_the_final_held_out_loss_where_the_log_has_none(drawn, tmp_path):
    history = [{"loss": 2.8, "step": 10}, {"loss": 2.6, "step": 20}]
    plots.plot_loss_curves(history, tmp_path / "a.png", eval_loss_before=3.0, eval_loss_after=2.5, steps=25)
    plots.plot_loss_curves(HISTORY, tmp_path / "b.png", eval_loss_after=9.9)  # the log's step-20 evaluation wins
    assert _lines(drawn[0])["held-out loss"] == ([0, 25], [3.0, 2.5])
    assert _lines(drawn[1])["held-out loss"] == ([10, 20], [2.7, 2.55])
    assert "before training" not in _lines(drawn[1])


def test_loss_plot_of_an_empty_log_says_so_rather_than_showing_nothing(drawn, tmp_path):
    plots.plot_loss_curves([], tmp_path / "loss.png")
    plots.plot_loss_curves([{"loss": 2.0, "step": 1}], tmp_path / "one.png")  # the old call still works
    title = drawn[0].axes[0].get_title()
    assert "no train loss logged" in title and "no held-out loss" in title
    assert [t.get_text() for t in drawn[0].axes[0].texts] == ["nothing was logged"]
    assert "one train loss logged" in drawn[1].axes[0].get_title()


def test_loss_plot_writes_a_png(tmp_path):
    path = plots.plot_loss_curves(HISTORY, tmp_path / "loss_curve.png", eval_loss_before=3.0)
    assert path == tmp_path / "loss_curve.png" and path.read_bytes()[:4] == b"\x89PNG"


# --- speed vs quality ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["score", "truncation", "contiguous"])
def test_speed_quality_shows_the_frontier_the_strategies_and_rings_the_chosen_one(drawn, tmp_path, strategy):
    selection = make_selection(SCORES, top_pct=50, strategy=strategy)
    plots.plot_speed_quality(selection, tmp_path / "speed_quality.png")
    (fig,) = drawn
    lines = _lines(fig)
    for name, alt in selection.alternatives.items():
        label = f"{name} (from block {alt.lowest_layer})"
        assert lines[label] == ([alt.speedup], [pytest.approx(100 * alt.captured_share)])
    chosen = [label for label in lines if label.startswith("chosen: ")]
    assert chosen == [
        f"chosen: {strategy}, {selection.predicted_speedup:.2f}x, {selection.score_share:.1%}"
    ]  # fmt: skip
    assert lines[chosen[0]] == ([selection.predicted_speedup], [pytest.approx(100 * selection.score_share)])
    assert lines["all blocks"] == ([1.0], [100.0])
    pareto = [p for p in selection.frontier if p.pareto]
    others = [p for p in selection.frontier if not p.pareto]
    assert len(lines["truncation frontier (Pareto)"][0]) == len(pareto) > 0
    assert len(lines.get("other truncation candidates", ([], []))[0]) == len(others)
    assert selection.cost_model in fig.axes[0].get_title()
    assert "speedup" in fig.axes[0].get_xlabel() and "score captured" in fig.axes[0].get_ylabel()


def test_speed_quality_of_a_selection_read_back_from_json(drawn, tmp_path):
    selection = Selection.from_dict(make_selection(SCORES, strategy="truncation").to_dict())
    plots.plot_speed_quality(selection, tmp_path / "speed_quality.png")
    assert any(label.startswith("chosen: truncation") for label in _legend(drawn[0]))


def test_speed_quality_of_given_layers_says_there_is_nothing_to_compare(tmp_path, drawn):
    plots.plot_speed_quality(Selection.given([2, 3]), tmp_path / "speed_quality.png")
    assert "nothing to compare" in drawn[0].axes[0].get_title()


def test_speed_quality_writes_a_png(tmp_path):
    path = plots.plot_speed_quality(make_selection(SCORES), tmp_path / "speed_quality.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
