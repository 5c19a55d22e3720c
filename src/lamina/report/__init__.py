"""`lamina report RUN_DIR`: one self-contained HTML page per run (lamina.report.html). The run plots live in the
leaf module lamina.plots; plot_curves / plot_confusion stay importable from here."""

from lamina.plots import plot_confusion, plot_curves

__all__ = ["plot_confusion", "plot_curves"]
