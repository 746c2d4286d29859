"""The YAML model of relay's config (`model`: `load` and `Config`), `${VAR}` in values, and the rule
set built from its `rules:` (`ruleset`); each problem reported as file:line with a did-you-mean.
"""
