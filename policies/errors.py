"""The one error type of the policy layer: a bad policy name, spec or parameter."""

import contextlib
import operator


class PolicyError(ValueError):
    """A policy name, spec or parameter the registry cannot use.

    The message names the value and what was expected; callers that know where the value came from
    (``tiered_store``: the YAML key) re-raise it with that location.

    Examples
    --------
    >>> from policies import PolicySpec
    >>> PolicySpec.parse("static+sieve+lru")
    Traceback (most recent call last):
    ...
    policies.errors.PolicyError: policy 'static+sieve+lru' names two eviction policies; expected one
    """


def check_int_option(policy: str, option: str, value: object, least: int | None) -> int:
    """``value`` as an int (a Python or NumPy integer, a 0-d integer array or a torch integer);
    a PolicyError naming ``policy``'s ``option`` unless it is one (a bool is not one, nor a bool
    tensor) >= ``least`` (None: any).

    >>> check_int_option("lfu", "aging_period", 2.5, 1)
    Traceback (most recent call last):
    ...
    policies.errors.PolicyError: lfu aging_period: got 2.5; expected an integer >= 1
    """
    at_least = "" if least is None else f" >= {least}"
    number = None
    if not isinstance(value, bool) and str(getattr(value, "dtype", "")) != "torch.bool":
        # NumPy refuses its bools and 0-d float arrays here, torch its floats (RuntimeError: a
        # uint64 tensor past int64)
        with contextlib.suppress(TypeError, RuntimeError):
            number = operator.index(value)
    if number is None:
        raise PolicyError(f"{policy} {option}: got {value!r}; expected an integer{at_least}")
    if least is not None and number < least:
        raise PolicyError(f"{policy} {option}: got {value!r}; expected an integer >= {least}")
    return number
