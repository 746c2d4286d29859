"""How a setting or a rule option is read from YAML: where each value came from, as file:line
(`yaml_source`), and dataclasses built from mappings with typed fields and a did-you-mean for a
misspelt key (`fields`). Used by `relay.config`, `relay.pipeline` and the rules alike, so it
imports none of them.
"""
