"""Experiment presets of ``ct2mr train`` (YAML files read by :func:`ct2mr.training.config.load_config`)."""
