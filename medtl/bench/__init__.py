"""`medtl bench ...`: throughput measured against a baseline in the same run, printed as ratios."""
