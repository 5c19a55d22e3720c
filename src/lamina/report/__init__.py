from lamina.report.plots import plot_confusion, plot_curves
