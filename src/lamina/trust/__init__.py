"""Trust and insight: tools that work on any model keeping the zoo's contract and return numbers a report shows.

    explain      saliency, integrated gradients, SmoothGrad, Grad-CAM, occlusion (captum); attention rollout;
                 token attributions; the model-randomization sanity check
    robust       FGSM, PGD (L-inf / L2), APGD-CE; robust accuracy; the attacks adversarial training uses
    fairness     per-group metrics, demographic-parity / equalized-odds differences (fairlearn); reweighting
    calibration  ECE, reliability diagrams, temperature scaling
    gradients    the GradientHealth callback and diagnosis of vanishing / exploding gradients
    overfitting  overfitting onset, the OverfittingMonitor callback, learning curves
    audit        all of the above that applies to a run folder, then the HTML report (lamina.report.html)

Modules import their optional packages (captum, fairlearn) lazily: `import lamina.trust` needs neither."""
