"""The presets (`--config NAME`): YAML files shipped inside the package (importlib.resources), so an installed wheel
finds them as a checkout does. tiny.yaml is the code's defaults; every other preset holds its differences from them.
"""
