"""The one error type of the policy layer: a bad policy name, spec or parameter."""


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
