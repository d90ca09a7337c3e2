"""YAML configs shipped with the package; `advmim fit --config NAME` finds them by name."""
