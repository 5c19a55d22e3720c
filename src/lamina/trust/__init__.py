"""Trust and insight: calibration, gradient health, (explanations, robustness, fairness: see their modules).

Each tool works on any model that keeps the zoo's contract and returns numbers a report can show."""
