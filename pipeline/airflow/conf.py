"""A run's ``conf``: the keys a trigger may set are the DAG's declared parameters, nothing else.

Airflow validates the *values* of declared params, but passes any other key on unread, so a typo
(``epoch: 3``) would run the week with the configured epochs. Two places refuse such a key with
:func:`unknown_keys_message`: the API server's middleware (``plugins/asr_conf_guard.py``: the REST
API and the UI, a 400 before any run exists) and the DAG's first task (``airflow dags trigger`` and
``airflow dags test``, which write the run to the metadata DB directly: the run fails at once,
before any stage has run, and is not retried).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def unknown_keys_message(dag_id: str, conf: Mapping[str, Any], known: Iterable[str]) -> str | None:
    """Why ``conf`` is refused (its keys that are not params of ``dag_id``), or None if it is not."""
    known = sorted(known)
    unknown = sorted(k for k in conf if k not in known)
    if not unknown:
        return None
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    noun = "parameter" if len(unknown) == 1 else "parameters"
    return (f"unknown {noun} {', '.join(parts)} in conf of {dag_id}; "
            f"its parameters are: {', '.join(known) or '(none)'}")
