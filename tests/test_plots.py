"""The figures are written, complete, through temporary files."""

import os

import pytest
from PIL import Image

import folders
import plots
from file_utils import UserError


def assert_png(path, min_width):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_width
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")]


def test_architecture_diagram(tmp_path):
    plots.architecture_diagram(str(tmp_path / "architecture.png"))
    assert_png(str(tmp_path / "architecture.png"), 800)


def test_sample_grid_shows_both_domains(tiny_data, tmp_path):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    plots.sample_grid(split, str(tmp_path / "samples.png"))
    assert_png(str(tmp_path / "samples.png"), 200)


def test_training_curves_tolerate_columns_missing_in_some_epochs(tmp_path):
    rows = [{"epoch": 1, "label_loss": 1.0, "lambda": 0.1, "monitor_snd": 3.0},
            {"epoch": 2, "label_loss": 0.5, "lambda": 0.4, "val_target_accuracy": 0.6,
             "monitor_snd": 3.2, "monitor_target_entropy": -0.4}]
    plots.training_curves(rows, str(tmp_path / "curves.png"))
    assert_png(str(tmp_path / "curves.png"), 800)


def test_confusion_matrix(tmp_path):
    plots.confusion_matrix([[3, 1], [0, 4]], ["a", "b"], "test", str(tmp_path / "c.png"))
    assert_png(str(tmp_path / "c.png"), 200)


def test_the_readme_figures_never_replace_a_users_file(tiny_data, tmp_path):
    (tmp_path / "samples.png").write_text("the user's")
    with pytest.raises(UserError, match="samples.png is a file this command did not"):
        plots.readme_figures(tiny_data, str(tmp_path))
    assert (tmp_path / "samples.png").read_text() == "the user's"
    assert not (tmp_path / "architecture.png").exists()
    (tmp_path / "samples.png").unlink()
    written = plots.readme_figures(tiny_data, str(tmp_path))
    assert plots.readme_figures(tiny_data, str(tmp_path)) == written  # its own: replaced
