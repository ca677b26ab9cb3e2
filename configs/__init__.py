"""The recipes, in the big_vision style: `get_config(arg)` of a file, with variants after a colon
(`configs/predict25_4step.py:tiny`). A package so that a run's saved config.json can be completed from its recipe's
defaults (trigflow_distill.training.run_config.default_config)."""
