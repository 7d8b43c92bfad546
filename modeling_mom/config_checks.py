"""Field checks shared by the three configurations.

Each check raises a `ValueError` that names the field, its value and what is allowed. A configuration runs its checks
(`validate_architecture`) when it is built, when `from_pretrained` has applied its keyword overrides, and before
it is saved (`ValidatedConfigMixin`); the models run them again before building any layer, so that a field set as
an attribute after construction is caught there too.
"""

import math

from transformers.activations import ACT2FN


class ValidatedConfigMixin:
    """Runs the configuration's checks where transformers does not: after `from_dict` has applied the keyword
    overrides of `from_pretrained(path, field=value)` (set as attributes, unchecked), and before `save_pretrained`
    writes anything (transformers copies the code files first and validates when it writes `config.json`, so a field
    made invalid after construction left a directory of code files without a configuration)."""

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).validate_architecture()  # (config, unused kwargs)
        return loaded

    def __setattr__(self, name, value):
        """An alias of `attribute_map` (ModuleFormer's official MoLM keys) is set through the field it names, so that
        `@strict`, which looks its type checks up by the name given, checks the value (`n_layer=2.5` passed before)."""
        if name in type(self).attribute_map:
            setattr(self, type(self).attribute_map[name], value)
        else:
            super().__setattr__(name, value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.validate_architecture()  # a plain ValueError for this package's fields
        self.validate()  # every other check transformers makes when it writes config.json
        return super().save_pretrained(save_directory, *args, **kwargs)


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


def is_real(value) -> bool:
    """An int or float (not a bool): values kept inside dicts, such as RoPE's, escape `@strict`'s type checks."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_non_negative(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        ok = is_real(value) and math.isfinite(value) and value >= 0
        require(ok, f"{name}={value!r} must be a finite number >= 0.")


def check_finite_positive(config, names) -> None:
    """Real-valued fields that must be > 0 and finite (an infinite epsilon or temperature gives constant outputs)."""
    for name in names:
        value = getattr(config, name)
        ok = is_real(value) and math.isfinite(value) and value > 0
        require(ok, f"{name}={value!r} must be a finite number > 0.")


def check_dropouts(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        require(is_real(value) and 0 <= value < 1, f"{name}={value!r}; allowed: [0, 1).")


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
    check_derived_set(config, ("initializer_range",))
    # > 0: transformers' own initialisation reads `initializer_range or 0.02`, so 0 would mix stds
    check_finite_positive(config, (epsilon, "initializer_range"))
