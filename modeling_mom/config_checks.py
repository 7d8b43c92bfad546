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


def check_derived_set(config, names) -> None:
    """Fields whose None means "derive the default" get it when the configuration is built; set to None later (an
    attribute, or a `from_pretrained(path, field=None)` override), they need a value."""
    for name in names:
        require(
            getattr(config, name) is not None,
            f"{name}=None: its default is derived only when the configuration is built; give a value.",
        )


def derived_property(getter, rule: str) -> property:
    """A read-only field computed from others (`rule` says from which); setting it, as a keyword at construction or
    a `from_pretrained` override, raises a `ValueError` that says what to set instead."""

    def refuse(config, value):
        name = type(config).__name__
        raise ValueError(f"{getter.__name__}={value!r}: {name} derives it as {rule}; set those fields.")

    return property(getter, refuse, doc=getter.__doc__)


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
    check_derived_set(config, ("initializer_range",))
    require(config.initializer_range >= 0, f"initializer_range={config.initializer_range} must be >= 0.")
