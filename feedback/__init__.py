"""prefloop's judges: LLM, rule, reward-model and ensemble feedback written as ordinary labels.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise

Only the judges live here (configs, rubrics, the pure judge core, the batch runner, calibration
and their `prefloop judge` commands); rounds and the demo are in loop/. See docs/judges.md.
"""
