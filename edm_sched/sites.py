"""Destination sites, the host's site resolver hook, and warm-up ramps.

Recipient domains map to *sites* (``google``, ``microsoft``...) in
``edm.site_domains``; limits and suspensions apply per site (see
docs/explanation/traffic-shaping.md). This module holds the operations of the
host API over them (run by :class:`edm_sched.api.Scheduler` and
:class:`edm_sched.api.AsyncScheduler`), the resolver hook's plumbing and the
warm-up ramps of ``edm.service_warmups``.

The resolver hook is a callable the host passes as
``Scheduler(..., site_resolver=hook)``: it receives a list of domains no site
maps yet and returns ``{domain: site or None}`` (an MX lookup, say). After a
task is created the scheduler asks it about the task's unmapped recipient
domains and caches its answers (``edm.cache_site_domains``; a cached answer
never overrides a shipped or admin mapping). The hook may be slow or fail: a
failure is logged and the task stands, its recipients of unresolved domains
simply have no site until a later answer maps them.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from edm_sched import errors
from edm_sched.core import Fetch, Op
from edm_sched.models import validate
from edm_sched.sqlfiles import query

log = logging.getLogger("edm_sched.sites")

MAX_RAMP_DAYS = 366
MAX_CEILING = 100_000_000
MAX_DOMAINS = 10_000

SiteName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
"""A site's name: 1 to 64 of a-z 0-9 _ . -, starting with a letter or digit."""

_DOMAIN_BAD = re.compile(r"[\s@\x00-\x1f\x7f]")


def _domain(value: str) -> str:
    if not 1 <= len(value) <= 253 or _DOMAIN_BAD.search(value):
        raise ValueError("a domain is 1 to 253 characters without spaces, controls or @")
    return value.lower()


Domain = Annotated[str, AfterValidator(_domain)]
"""A recipient domain (what follows the @), stored lower case."""

SiteAnswer = Mapping[str, "str | None"]
SiteResolver = Callable[[list[str]], "SiteAnswer | Awaitable[SiteAnswer]"]
"""The host's hook: unmapped domains in, ``{domain: site or None}`` out (may be async)."""


# --------------------------------------------------------------------- models


class Site(BaseModel):
    """A destination site (``edm.sites``) and how many domains map to it."""

    model_config = ConfigDict(frozen=True)
    site: str
    description: str
    domains: int
    created_at: dt.datetime


class SiteDomain(BaseModel):
    """One mapped domain (``edm.site_domains``)."""

    model_config = ConfigDict(frozen=True)
    domain: str
    site: str
    source: Literal["shipped", "admin", "resolved"]
    resolved_at: dt.datetime


class Warmup(BaseModel):
    """Where a service's warm-up stands (``edm.service_warmup_status``): day n of N."""

    model_config = ConfigDict(frozen=True)
    service_id: int
    service_name: str
    started_on: dt.date
    day: int
    days: int
    state: Literal["scheduled", "ramping", "ended"]
    ceiling_today: int | None
    ceiling_in_force: int | None
    used_today: int | None
    ceiling_tomorrow: int | None
    final_ceiling: int
    next_day_at: dt.datetime
    ramp: list[int]


def _ramp(value: list[int] | None) -> list[int] | None:
    if value is None or not value:
        return None
    if len(value) > MAX_RAMP_DAYS:
        raise ValueError(f"a ramp lasts at most {MAX_RAMP_DAYS} days")
    if any(b < a for a, b in itertools.pairwise(value)):
        raise ValueError("a ramp never decreases (each day's ceiling is at least the day before's)")
    return value


class SiteDomainsArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="site domains")
    site: SiteName
    domains: list[Domain] = Field(max_length=MAX_DOMAINS)
    description: str | None = Field(default=None, max_length=500)


class SuspendSiteArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="site suspension")
    service_id: int = Field(ge=1, le=2**62)
    site: SiteName
    until: pydantic.AwareDatetime
    reason: str = Field(min_length=1, max_length=2000)


class WarmupArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="warm-up")
    service_id: int = Field(ge=1, le=2**62)
    ramp: Annotated[list[Annotated[int, Field(ge=1, le=MAX_CEILING)]] | None,
                    AfterValidator(_ramp)] = None
    started_on: dt.date | None = None


class RampArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="warm-up ramp")
    start: int = Field(ge=1, le=MAX_CEILING)
    full: int = Field(ge=1, le=MAX_CEILING)
    factor: Annotated[float | int | Decimal, Field(gt=1, le=100)] = 2


# -------------------------------------------------------------------- helpers


def warmup_ramp(start: int, full: int, factor: float | int | Decimal = 2) -> list[int]:
    """A growing warm-up ramp: ``start`` on day 1, then each day the day before's
    ceiling times ``factor`` (rounded up) until ``full``, the last day.

    ``warmup_ramp(50, 1000) == [50, 100, 200, 400, 800, 1000]``. The same as SQL's
    ``edm.warmup_ramp`` (tested), computed here without a database.
    Raises :class:`errors.InvalidInput` for bad bounds or a ramp over 366 days.
    """
    a = validate(RampArgs, {"start": start, "full": full, "factor": factor})
    if a.full < a.start:
        raise errors.InvalidInput(
            f"invalid warm-up ramp: full ({a.full}) is below start ({a.start})")
    f = Fraction(str(a.factor)) if isinstance(a.factor, float) else Fraction(a.factor)
    ramp = [a.start]
    while ramp[-1] < a.full:
        ramp.append(min(a.full, math.ceil(ramp[-1] * f)))
        if len(ramp) > MAX_RAMP_DAYS:
            raise errors.InvalidInput(
                f"invalid warm-up ramp: from {a.start} to {a.full} by a factor of {a.factor} "
                f"takes more than {MAX_RAMP_DAYS} days")
    return ramp


def clean_answers(asked: Iterable[str], answer: Any) -> tuple[list[str], list[str]]:
    """The resolver's answer as (domains, sites) to cache: only domains that were
    asked, with a valid site name; anything else is logged and left out."""
    if not isinstance(answer, Mapping):
        log.warning("site resolver returned %s, not a mapping; nothing cached",
                    type(answer).__name__)
        return [], []
    wanted = set(asked)
    domains: list[str] = []
    sites: list[str] = []
    for domain, site in answer.items():
        if site is None:
            continue
        if not isinstance(domain, str) or domain.lower() not in wanted:
            log.warning("site resolver answered %r, which was not asked; ignored", domain)
            continue
        if not isinstance(site, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", site):
            log.warning("site resolver mapped %s to %r, not a site name; ignored", domain, site)
            continue
        domains.append(domain.lower())
        sites.append(site)
    return domains, sites


# ----------------------------------------------------------------- operations


def set_site_domains(site: str, domains: Iterable[str], description: str | None) -> Op[int]:
    a = validate(SiteDomainsArgs, {"site": site, "domains": list(domains),
                                   "description": description})
    row = yield Fetch(query("sites_set_domains"), (a.site, a.domains, a.description))
    assert row is not None
    return int(row[0])


def sites() -> Op[list[Site]]:
    rows = yield Fetch(query("sites_list"), rows="all", dicts=True)
    return [Site.model_validate(r) for r in rows]


def site_domains(site: str) -> Op[list[SiteDomain]]:
    validate(SiteDomainsArgs, {"site": site, "domains": []})
    rows = yield Fetch(query("sites_domains"), (site,), rows="all", dicts=True)
    if not rows:
        known = yield Fetch(query("sites_exists"), (site,))
        if not (known and known[0]):
            raise errors.NotFound(f"unknown site {site}")
    return [SiteDomain.model_validate(r) for r in rows]


def suspend_site(service_id: int, site: str, until: dt.datetime, reason: str) -> Op[None]:
    a = validate(SuspendSiteArgs, {"service_id": service_id, "site": site, "until": until,
                                   "reason": reason})
    yield Fetch(query("sites_suspend"), (a.service_id, a.site, a.until, a.reason))


def warmup(service_id: int) -> Op[Warmup | None]:
    a = validate(WarmupArgs, {"service_id": service_id})
    row = yield Fetch(query("warmup_status"), (a.service_id,), dicts=True)
    return None if row is None else Warmup.model_validate(row)


def set_service_warmup(service_id: int, ramp: list[int] | None,
                       started_on: dt.date | None) -> Op[Warmup | None]:
    a = validate(WarmupArgs, {"service_id": service_id,
                              "ramp": None if ramp is None else list(ramp),
                              "started_on": started_on})
    yield Fetch(query("warmup_set"), (a.service_id, a.ramp, a.started_on))
    return (yield from warmup(a.service_id))


def unmapped_of_task(task_id: int) -> Op[list[str]]:
    rows = yield Fetch(query("sites_unmapped_of_task"), (task_id,), rows="all")
    return [r[0] for r in rows]


def unmapped(domains: Iterable[str]) -> Op[list[str]]:
    checked = pydantic.TypeAdapter(list[Domain])
    try:
        asked = checked.validate_python(list(domains))
    except pydantic.ValidationError as exc:
        raise errors.InvalidInput(f"invalid domains: {exc.errors()[0]['msg']}") from None
    rows = yield Fetch(query("sites_unmapped"), (asked,), rows="all")
    return [r[0] for r in rows]


def cache(domains: list[str], site_names: list[str]) -> Op[int]:
    if not domains:
        return 0
    row = yield Fetch(query("sites_cache"), (domains, site_names))
    return 0 if row is None else int(row[0])


__all__ = ["Domain", "Site", "SiteDomain", "SiteName", "SiteResolver", "Warmup",
           "clean_answers", "warmup_ramp"]
