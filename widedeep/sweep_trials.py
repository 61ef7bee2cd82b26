"""A claimed group's Optuna trials, written in one transaction to start them and one to end.

Optuna's public API writes a trial field by field, each in a session of its own: ~21 ms per
trial on the dev VM (create 11, its number 2.6, four attributes ~1.5 each, the state 2),
while the batched engine trains a lecture net in about a millisecond -- recording had become
most of a sweep's work. Here the same rows go straight into Optuna's tables, a group at a
time. The tables are those of Optuna's own models (so their columns are the installed
Optuna's, whose schema version it checked when the storage opened); a trial's number is
counted as Optuna counts it (the study's trials with a smaller id) under the study row's
lock, as Optuna takes it. Where those models are not the ones this module knows, the public
API writes the same trials (:data:`FAST` is False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import TrialState, create_trial


@dataclass
class NewTrial:
    """A RUNNING trial to create: params by their external values."""

    params: dict
    distributions: dict[str, BaseDistribution]
    user_attrs: dict = field(default_factory=dict)
    system_attrs: dict = field(default_factory=dict)


@dataclass
class Ending:
    """How a RUNNING trial ends: its state, objective value (COMPLETE) and new attributes."""

    trial_id: int
    state: TrialState
    value: float | None = None
    user_attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Schema:
    tables: dict[str, sa.Table]
    stored_value: object  # TrialValueModel.value_to_stored_repr: float -> (value, type)


def _schema() -> _Schema | None:
    """Optuna's trial tables, or None where its models are not the ones known here."""
    want = {"studies": ("StudyModel", {"study_id"}),
            "trials": ("TrialModel", {"trial_id", "number", "study_id", "state",
                                      "datetime_start", "datetime_complete"}),
            "params": ("TrialParamModel", {"trial_id", "param_name", "param_value",
                                           "distribution_json"}),
            "values": ("TrialValueModel", {"trial_id", "objective", "value", "value_type"}),
            "user": ("TrialUserAttributeModel", {"trial_id", "key", "value_json"}),
            "system": ("TrialSystemAttributeModel", {"trial_id", "key", "value_json"})}
    try:
        from optuna.storages._rdb import models

        tables = {k: getattr(models, cls).__table__ for k, (cls, _) in want.items()}
        stored_value = models.TrialValueModel.value_to_stored_repr
    except (ImportError, AttributeError):
        return None
    if any(not cols <= set(tables[k].c.keys()) for k, (_, cols) in want.items()):
        return None
    return _Schema(tables, stored_value)


# Optuna < 4 raises a plain RuntimeError for a write to a finished trial
_FINISHED = getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)
SCHEMA = _schema()
FAST = SCHEMA is not None


def start(storage: optuna.storages.RDBStorage, study_id: int, trials: list[NewTrial], *,
          fast: bool = FAST) -> list[tuple[int, int]]:
    """Create ``trials`` RUNNING in study ``study_id``; their (trial id, number), in order."""
    if not trials:
        return []
    if not fast:
        out = []
        for t in trials:
            template = create_trial(state=TrialState.RUNNING, params=t.params,
                                    distributions=t.distributions, user_attrs=t.user_attrs,
                                    system_attrs=t.system_attrs)
            trial_id = storage.create_new_trial(study_id, template_trial=template)
            out.append((trial_id, storage.get_trial_number_from_id(trial_id)))
        return out
    tb, now = SCHEMA.tables, datetime.now()
    trials_t = tb["trials"]
    out, params, user, system = [], [], [], []
    with storage.engine.begin() as conn:
        studies = tb["studies"]
        conn.execute(sa.select(studies.c.study_id).where(studies.c.study_id == study_id)
                     .with_for_update())  # as Optuna: numbers are counted under this lock
        for t in trials:
            trial_id = conn.execute(trials_t.insert().values(
                study_id=study_id, number=None, state=TrialState.RUNNING,
                datetime_start=now)).inserted_primary_key[0]
            number = conn.execute(sa.select(sa.func.count(trials_t.c.trial_id)).where(
                trials_t.c.study_id == study_id, trials_t.c.trial_id < trial_id)).scalar_one()
            conn.execute(trials_t.update().where(trials_t.c.trial_id == trial_id)
                         .values(number=number))
            out.append((trial_id, number))
            for name, value in t.params.items():
                dist = t.distributions[name]
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": dist.to_internal_repr(value),
                               "distribution_json": distribution_to_json(dist)})
            user += _attr_rows(trial_id, t.user_attrs)
            system += _attr_rows(trial_id, t.system_attrs)
        _insert(conn, params=params, user=user, system=system)
    return out


def end(storage: optuna.storages.RDBStorage, endings: list[Ending], *,
        fast: bool = FAST) -> list[bool]:
    """End RUNNING trials with their values and attributes (new keys only); False for a
    trial that had already ended (its lease was taken over): nothing is written to it."""
    if not fast:
        return [_end_public(storage, e) for e in endings]
    tb, now = SCHEMA.tables, datetime.now()
    trials_t = tb["trials"]
    out, values, user = [], [], []
    with storage.engine.begin() as conn:
        for e in endings:
            moved = conn.execute(trials_t.update().where(
                trials_t.c.trial_id == e.trial_id, trials_t.c.state == TrialState.RUNNING)
                .values(state=e.state, datetime_complete=now)).rowcount == 1
            out.append(moved)
            if not moved:
                continue
            if e.value is not None:
                stored, kind = SCHEMA.stored_value(e.value)
                values.append({"trial_id": e.trial_id, "objective": 0, "value": stored,
                               "value_type": kind})
            user += _attr_rows(e.trial_id, e.user_attrs)
        _insert(conn, values=values, user=user)
    return out


def _end_public(storage: optuna.storages.RDBStorage, e: Ending) -> bool:
    try:
        for key, value in e.user_attrs.items():
            storage.set_trial_user_attr(e.trial_id, key, value)
        storage.set_trial_state_values(e.trial_id, e.state,
                                       None if e.value is None else [e.value])
    except _FINISHED:
        return False
    return True


def _insert(conn: sa.Connection, **rows: list[dict]) -> None:
    """Rows into Optuna's tables, named as in ``SCHEMA.tables``, one statement per table."""
    for key, table_rows in rows.items():
        if table_rows:
            conn.execute(SCHEMA.tables[key].insert(), table_rows)


def _attr_rows(trial_id: int, attrs: dict) -> list[dict]:
    return [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in attrs.items()]
