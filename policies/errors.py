"""The one error type of the policy layer: a bad policy name, spec or parameter."""

import numbers


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


def check_int_option(policy: str, option: str, value: object, least: int | None) -> None:
    """PolicyError naming ``policy``'s ``option`` unless ``value`` is an integer (a bool is not
    one) >= ``least`` (None: any).

    >>> check_int_option("lfu", "aging_period", 2.5, 1)
    Traceback (most recent call last):
    ...
    policies.errors.PolicyError: lfu aging_period: got 2.5; expected an integer >= 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        at_least = "" if least is None else f" >= {least}"
        raise PolicyError(f"{policy} {option}: got {value!r}; expected an integer{at_least}")
    if least is not None and value < least:
        raise PolicyError(f"{policy} {option}: got {value!r}; expected an integer >= {least}")
