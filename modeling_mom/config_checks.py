"""Field checks shared by the three configurations.

Each check raises a `ValueError` that names the field, its value and what is allowed. A configuration runs its checks
(`validate_architecture`) when it is built, `@strict` runs them again when it is saved, and the models run them again
before building any layer, so that a field changed after construction (`from_pretrained(path, field=value)` sets
overrides on the built configuration) is caught there too.
"""

from transformers.activations import ACT2FN


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_positive(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        require(value >= 1, f"{name}={value} must be a positive integer.")


def check_non_negative(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        require(value >= 0, f"{name}={value} must be >= 0.")


def check_dropouts(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        require(0 <= value < 1, f"{name}={value}; allowed: [0, 1).")


def check_choices(config, allowed_by_name: dict) -> None:
    for name, allowed in allowed_by_name.items():
        value = getattr(config, name)
        require(value in allowed, f"{name}={value!r}; allowed: {tuple(allowed)}.")


def check_common(config, epsilon: str) -> None:
    """The fields every architecture has: `hidden_act` (a transformers activation), the LayerNorm epsilon (named
    `epsilon`), `initializer_range`."""
    require(
        config.hidden_act in ACT2FN,
        f"hidden_act={config.hidden_act!r} is not a transformers activation; allowed: {sorted(ACT2FN)}.",
    )
    require(getattr(config, epsilon) > 0, f"{epsilon}={getattr(config, epsilon)} must be > 0.")
    require(
        config.initializer_range is None or config.initializer_range >= 0,
        f"initializer_range={config.initializer_range} must be >= 0.",
    )
