"""The YAML model (`model`), loading it with file:line and `${VAR}` (`yaml_source`), typed
fields with did-you-mean (`fields`), and the rule set built from it (`ruleset`).
"""
