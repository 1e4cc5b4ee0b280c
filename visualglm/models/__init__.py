"""Model code: a function of config and weights (imports torch and ``visualglm.config`` only)."""
