"""Head search: a feature cache of the frozen base, and successive halving over head configs."""
