-- 0008_limits_and_slots: sending limits as real accounts have them, slot-timed
-- sends, leases kept alive while a provider is slow, uncertain outcomes
-- recorded (issues "rate model" and "when providers misbehave").
--
--   * edm.service_limits: any number of limits per service on top of the two
--     built-in ones (services.interval_ms, services.daily_quota): a rate with
--     a burst (GCRA, a token bucket), a rolling window (exact upper bound
--     from bucketed counts) or a calendar day in a time zone;
--   * edm.claim_v2 hands each claimed subtask its slot (send_at: the instant
--     it may be sent). A service may be claimed up to queue.slot_lookahead_ms
--     before its next slot, so the dispatcher is ready and waiting when the
--     slot comes (pacing on the wire, not at claim time); one call may give a
--     service several slots (a burst, or no interval), spread over users in
--     the fair order;
--   * a claimed service is held by the claiming dispatcher for
--     queue.service_hold_seconds after its last slot: every send of a service
--     in that time comes from one process, which paces them on the wire
--     (no two processes interleave sends of one account);
--   * due retries are taken before their task's fresh recipients;
--   * the lease starts at the slot and edm.renew_leases keeps it alive while
--     the transport waits on a slow server (fenced like completions);
--   * edm.complete gains the outcomes `uncertain` (the connection was lost
--     after the final dot: recorded before any resend, counted on the
--     subtask) and `render_error` (the message could not be built: failed
--     at once, spending no attempt and no quota unit);
--   * edm.possible_duplicates lists every subtask that may have been
--     delivered more than once, from one query.
-- Lock order is unchanged (subtasks, services, tasks, users); the claim still
-- never waits.

-- ---------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('queue.slot_lookahead_ms', '250', '250', 'queue', 'integer', 0, 5000, 'milliseconds', 'How long before its slot a send may be claimed: the dispatcher renders the message and opens the connection meanwhile, and starts the SMTP transaction at the slot.'),
  ('queue.service_hold_seconds', '2', '2', 'queue', 'integer', 1, 60, 'seconds', 'A service claimed by a dispatcher is held by it for this long after its last slot (and while its sends run), so one process paces the service''s sends on the wire.'),
  ('queue.slot_lead_ms', '100', '100', 'queue', 'integer', 0, 5000, 'milliseconds', 'A paced service (an interval or an extra limit) claimed while idle gets its first slot this long after the claim (at most the lookahead), so the dispatcher has rendered the message and opened the connection by then: a first slot already past when the claim reaches the dispatcher makes its send late and the next one closer than the interval on the wire.');

-- ---------------------------------------------------------------------------
-- Columns
-- ---------------------------------------------------------------------------

ALTER TABLE edm.services
  ADD COLUMN held_by text,
  ADD COLUMN held_until timestamptz,
  ADD COLUMN has_limits boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN edm.services.held_by IS 'Dispatcher that holds this service (it claimed its latest slots); other dispatchers leave the service alone until held_until.';
COMMENT ON COLUMN edm.services.held_until IS 'End of the hold: queue.service_hold_seconds after the latest slot, extended while the holder''s sends run (edm.renew_leases).';
COMMENT ON COLUMN edm.services.has_limits IS 'True when edm.service_limits has rows for this service (kept by a trigger); the claim reads them only then.';
COMMENT ON COLUMN edm.services.quota_exhausted_until IS 'When a limit next admits a send once the daily quota or another limit (edm.service_limits) is used up; NULL otherwise. Part of next_available_at.';
COMMENT ON COLUMN edm.services.last_sent_at IS 'Slot of the latest claimed send (the instant it may start on the wire); the interval is counted from here.';

ALTER TABLE edm.subtasks
  ADD COLUMN uncertain_sends smallint NOT NULL DEFAULT 0 CHECK (uncertain_sends >= 0);
COMMENT ON COLUMN edm.subtasks.uncertain_sends IS 'Attempts whose outcome nobody can know because the connection was lost or timed out after the final dot (the provider may have the message). With lease_expiries, the count of possible duplicates (I1).';
COMMENT ON COLUMN edm.subtasks.leased_at IS 'Slot of the current or latest attempt: the instant its send may start.';
COMMENT ON COLUMN edm.subtasks.lease_expires_at IS 'Lease expiry (slot + lease, extended by edm.renew_leases while the send runs); afterwards the sweep returns the subtask to pending and records an uncertain outcome.';

ALTER TABLE edm.send_events DROP CONSTRAINT send_events_kind_check;
ALTER TABLE edm.send_events ADD CONSTRAINT send_events_kind_check
  CHECK (kind IN ('sent', 'retry', 'failed', 'service_failure', 'released', 'lease_expired',
                  'late_completion', 'cancelled', 'uncertain', 'render_error'));
COMMENT ON COLUMN edm.send_events.kind IS 'sent, retry, failed, service_failure, released, lease_expired, late_completion, cancelled, uncertain (connection lost after the final dot) or render_error (the message could not be built; nothing was spent).';
COMMENT ON COLUMN edm.send_events.started_at IS 'Slot of the attempt (when its send could start).';

-- ---------------------------------------------------------------------------
-- Limits
-- ---------------------------------------------------------------------------

CREATE TABLE edm.service_limits (
  service_id   bigint NOT NULL REFERENCES edm.services ON DELETE CASCADE,
  name         text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
  kind         text NOT NULL CHECK (kind IN ('rate', 'rolling', 'calendar_day')),
  max_count    integer NOT NULL CHECK (max_count BETWEEN 0 AND 100000000),
  window_ms    bigint CHECK (window_ms BETWEEN 1 AND 31 * 86400000::bigint),
  burst        integer NOT NULL DEFAULT 1 CHECK (burst BETWEEN 1 AND 100000),
  time_zone    text CHECK (time_zone IS NULL OR edm.is_valid_timezone(time_zone)),
  -- state, written by claims only
  tat          timestamptz,
  bucket_idx   bigint[] NOT NULL DEFAULT '{}',
  bucket_n     integer[] NOT NULL DEFAULT '{}',
  day          date,
  day_count    integer NOT NULL DEFAULT 0 CHECK (day_count >= 0),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (service_id, name),
  CONSTRAINT service_limits_shape CHECK (
    CASE kind WHEN 'calendar_day' THEN window_ms IS NULL AND burst = 1
              WHEN 'rolling' THEN window_ms IS NOT NULL AND window_ms >= 1000 AND burst = 1
                                  AND time_zone IS NULL
              ELSE window_ms IS NOT NULL AND time_zone IS NULL AND burst <= greatest(max_count, 1) END),
  CONSTRAINT service_limits_buckets CHECK (cardinality(bucket_idx) = cardinality(bucket_n))
);
COMMENT ON TABLE edm.service_limits IS
  'Limits of a service beyond its built-in interval_ms and daily_quota, all held at once (the smallest headroom wins). rate: at most max_count per window_ms, in bursts of at most burst (a token bucket, checked by GCRA; burst 1 spaces sends window_ms/max_count apart, so no window of window_ms holds more than max_count). rolling: at most max_count in any window of window_ms (e.g. SES Max24HourSend). calendar_day: at most max_count per calendar day in time_zone (default: the service''s quota_tz). Set with edm.set_service_limits; see docs/explanation/rate-limits.md.';
COMMENT ON COLUMN edm.service_limits.service_id IS 'Service limited.';
COMMENT ON COLUMN edm.service_limits.name IS 'Name of the limit, unique per service (e.g. per_second, per_minute, rolling_24h); waiting reasons name it.';
COMMENT ON COLUMN edm.service_limits.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.service_limits.max_count IS 'Most sends per window (0 blocks the service).';
COMMENT ON COLUMN edm.service_limits.window_ms IS 'Window length in milliseconds (rate and rolling); NULL for calendar_day.';
COMMENT ON COLUMN edm.service_limits.burst IS 'rate only: most sends at once (token bucket depth); 1 spaces sends evenly.';
COMMENT ON COLUMN edm.service_limits.time_zone IS 'calendar_day only: time zone whose midnight starts a day; NULL = the service''s quota_tz.';
COMMENT ON COLUMN edm.service_limits.tat IS 'rate state: GCRA theoretical arrival time (a send at t is allowed when t >= tat - (burst - 1) * window_ms / max_count).';
COMMENT ON COLUMN edm.service_limits.bucket_idx IS 'rolling state: indexes (epoch milliseconds / bucket width) of the buckets with sends, oldest first; the bucket width is window_ms / 200 rounded up.';
COMMENT ON COLUMN edm.service_limits.bucket_n IS 'rolling state: sends slotted in each bucket of bucket_idx.';
COMMENT ON COLUMN edm.service_limits.day IS 'calendar_day state: the local date day_count counts.';
COMMENT ON COLUMN edm.service_limits.day_count IS 'calendar_day state: sends slotted on day.';
COMMENT ON COLUMN edm.service_limits.created_at IS 'When the limit was set.';

CREATE FUNCTION edm.service_limits_flag()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  UPDATE edm.services s
  SET has_limits = EXISTS (SELECT 1 FROM edm.service_limits l WHERE l.service_id = s.service_id),
      -- re-decide from scratch: the next claim recomputes any block
      quota_exhausted_until = NULL
  WHERE s.service_id IN (SELECT x.service_id FROM changed x);
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.service_limits_flag() IS
  'Statement trigger on edm.service_limits: keeps services.has_limits in step and clears a block computed from the old limits (the next claim recomputes it).';
CREATE TRIGGER service_limits_flag_ins AFTER INSERT ON edm.service_limits
  REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.service_limits_flag();
CREATE TRIGGER service_limits_flag_del AFTER DELETE ON edm.service_limits
  REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.service_limits_flag();

-- Width of a rolling limit's buckets: 200 per window, so a full window blocks
-- at most window/200 (0.5 %) longer than an exact sliding log would.
CREATE FUNCTION edm.limit_bucket_ms(p_window_ms bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(1, ceil(p_window_ms / 200.0)::bigint);
COMMENT ON FUNCTION edm.limit_bucket_ms(bigint) IS
  'Bucket width of a rolling limit of p_window_ms: window / 200, rounded up (at least 1 ms).';

CREATE FUNCTION edm.epoch_ms(p_ts timestamptz)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN floor(extract(epoch FROM p_ts) * 1000)::bigint;
COMMENT ON FUNCTION edm.epoch_ms(timestamptz) IS 'Milliseconds since 1970-01-01 UTC (floor).';

CREATE FUNCTION edm.limit_next(l edm.service_limits, p_at timestamptz, p_service_tz text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_tz   text := coalesce(l.time_zone, p_service_tz);
  v_bms  bigint;
  v_span bigint;
  v_b    bigint;
  v_sum  bigint := 0;
  v_need bigint;
  i      integer;
BEGIN
  IF l.max_count = 0 THEN
    RETURN 'infinity';
  END IF;
  IF l.kind = 'rate' THEN
    -- GCRA: allowed at t when t >= tat - tau, tau = (burst - 1) * T.
    RETURN greatest(p_at, l.tat - ((l.burst - 1) * l.window_ms::double precision / l.max_count)
                                   * interval '1 millisecond');
  ELSIF l.kind = 'calendar_day' THEN
    IF l.day = (p_at AT TIME ZONE v_tz)::date AND l.day_count >= l.max_count THEN
      RETURN edm.service_next_quota_day(v_tz, p_at);
    END IF;
    RETURN p_at;
  END IF;
  -- rolling: the sends counted at t are those of buckets b >= b(t) - span,
  -- which cover (t - window, t] and at most one bucket more (an upper bound).
  v_bms := edm.limit_bucket_ms(l.window_ms);
  v_span := ceil(l.window_ms::numeric / v_bms)::bigint;
  v_b := edm.epoch_ms(p_at) / v_bms;
  FOR i IN 1 .. cardinality(l.bucket_idx) LOOP
    IF l.bucket_idx[i] >= v_b - v_span THEN
      v_sum := v_sum + l.bucket_n[i];
    END IF;
  END LOOP;
  IF v_sum < l.max_count THEN
    RETURN p_at;
  END IF;
  -- Full: wait until enough of the oldest buckets have left the window.
  v_need := v_sum - l.max_count + 1;
  FOR i IN 1 .. cardinality(l.bucket_idx) LOOP
    CONTINUE WHEN l.bucket_idx[i] < v_b - v_span;
    v_need := v_need - l.bucket_n[i];
    IF v_need <= 0 THEN
      -- bucket i no longer counts once b(t) - span > bucket_idx[i]
      RETURN greatest(p_at, to_timestamp((l.bucket_idx[i] + v_span + 1) * v_bms / 1000.0));
    END IF;
  END LOOP;
  RETURN 'infinity';
END;
$$;
COMMENT ON FUNCTION edm.limit_next(edm.service_limits, timestamptz, text) IS
  'The earliest instant at or after p_at at which limit l admits one more send (infinity when max_count is 0). p_service_tz is the service''s quota_tz, the default day boundary of a calendar_day limit.';

CREATE FUNCTION edm.limits_next(p_service_id bigint, p_at timestamptz, p_service_tz text)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN coalesce((SELECT max(edm.limit_next(l, p_at, p_service_tz)) FROM edm.service_limits l
                 WHERE l.service_id = p_service_id), p_at);
COMMENT ON FUNCTION edm.limits_next(bigint, timestamptz, text) IS
  'The earliest instant at or after p_at at which every limit of the service in edm.service_limits admits one more send.';

-- A rolling limit's buckets after one more send at p_slot: that bucket gains
-- one, and buckets no window ending at or after p_slot can count are dropped.
CREATE FUNCTION edm.rolling_buckets_add(p_idx bigint[], p_n integer[], p_window_ms bigint,
                                        p_slot timestamptz,
                                        OUT bucket_idx bigint[], OUT bucket_n integer[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  SELECT array_agg(x.b ORDER BY x.b) AS bucket_idx, array_agg(x.n ORDER BY x.b) AS bucket_n
  FROM (
    SELECT u.b, sum(u.n)::integer AS n FROM (
      SELECT t.b, t.n FROM unnest(p_idx, p_n) AS t(b, n)
      UNION ALL
      SELECT edm.epoch_ms(p_slot) / edm.limit_bucket_ms(p_window_ms) AS b, 1 AS n) u
    WHERE u.b >= edm.epoch_ms(p_slot) / edm.limit_bucket_ms(p_window_ms)
                 - ceil(p_window_ms::numeric / edm.limit_bucket_ms(p_window_ms)) - 1
    GROUP BY u.b) x;
END;
COMMENT ON FUNCTION edm.rolling_buckets_add(bigint[], integer[], bigint, timestamptz) IS
  'The bucket arrays of a rolling limit (edm.service_limits.bucket_idx, bucket_n) after one more send slotted at p_slot: its bucket gains one, buckets older than any window that can still count are dropped.';

CREATE FUNCTION edm.limits_take(p_service_id bigint, p_slot timestamptz, p_service_tz text)
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
  UPDATE edm.service_limits l SET
    tat = CASE WHEN l.kind = 'rate'
               THEN greatest(coalesce(l.tat, p_slot), p_slot)
                    + (l.window_ms::double precision / greatest(l.max_count, 1)) * interval '1 millisecond'
               ELSE l.tat END,
    day_count = CASE WHEN l.kind <> 'calendar_day' THEN 0
                     WHEN l.day = (p_slot AT TIME ZONE coalesce(l.time_zone, p_service_tz))::date
                     THEN l.day_count + 1 ELSE 1 END,
    day = CASE WHEN l.kind = 'calendar_day'
               THEN (p_slot AT TIME ZONE coalesce(l.time_zone, p_service_tz))::date END,
    (bucket_idx, bucket_n) = (
      SELECT coalesce(r.bucket_idx, l.bucket_idx) AS bucket_idx,
             coalesce(r.bucket_n, l.bucket_n) AS bucket_n
      FROM edm.rolling_buckets_add(l.bucket_idx, l.bucket_n, l.window_ms, p_slot) r
      WHERE l.kind = 'rolling'
      UNION ALL
      SELECT l.bucket_idx AS bucket_idx, l.bucket_n AS bucket_n WHERE l.kind <> 'rolling')
  WHERE l.service_id = p_service_id;
END;
COMMENT ON FUNCTION edm.limits_take(bigint, timestamptz, text) IS
  'Counts one send slotted at p_slot against every limit of the service (the caller, the claim, checked edm.limits_next first and holds the service row lock).';

CREATE FUNCTION edm.set_service_limits(p_service_id bigint, p_limits jsonb)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'array' OR jsonb_array_length(p_limits) > 20 THEN
    RAISE EXCEPTION 'limits must be a JSON array of at most 20 limits' USING ERRCODE = 'ED005';
  END IF;
  PERFORM 1 FROM edm.services s WHERE s.service_id = p_service_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_limits) e
             WHERE jsonb_typeof(e) <> 'object'
                OR NOT (e ?& ARRAY['name', 'kind', 'max_count'])
                OR EXISTS (SELECT 1 FROM jsonb_object_keys(e) k
                           WHERE k NOT IN ('name', 'kind', 'max_count', 'window_ms', 'burst', 'time_zone'))) THEN
    RAISE EXCEPTION 'each limit is an object with name, kind, max_count and optionally window_ms, burst, time_zone'
      USING ERRCODE = 'ED005';
  END IF;
  -- Keep the state of limits that did not change shape (no fresh burst on an edit).
  DELETE FROM edm.service_limits l
  WHERE l.service_id = p_service_id
    AND NOT EXISTS (
      SELECT 1 FROM jsonb_array_elements(p_limits) e
      WHERE e->>'name' = l.name AND e->>'kind' = l.kind
        AND (e->>'max_count')::integer = l.max_count
        AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
        AND coalesce((e->>'burst')::integer, 1) = l.burst
        AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone);
  BEGIN
    INSERT INTO edm.service_limits (service_id, name, kind, max_count, window_ms, burst, time_zone)
    SELECT p_service_id, e->>'name', e->>'kind', (e->>'max_count')::integer,
           (e->>'window_ms')::bigint, coalesce((e->>'burst')::integer, 1), e->>'time_zone'
    FROM jsonb_array_elements(p_limits) e
    ON CONFLICT (service_id, name) DO NOTHING;
  EXCEPTION
    WHEN check_violation OR not_null_violation OR invalid_text_representation
         OR numeric_value_out_of_range OR cardinality_violation THEN
      RAISE EXCEPTION 'invalid limit: %', SQLERRM USING ERRCODE = 'ED005';
  END;
  IF (SELECT count(DISTINCT e->>'name') FROM jsonb_array_elements(p_limits) e)
     <> jsonb_array_length(p_limits) THEN
    RAISE EXCEPTION 'limit names must be unique per service' USING ERRCODE = 'ED005';
  END IF;
  UPDATE edm.services s SET updated_at = now(), quota_exhausted_until = NULL
  WHERE s.service_id = p_service_id;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  SELECT count(*) INTO v_n FROM edm.service_limits l WHERE l.service_id = p_service_id;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.set_service_limits(bigint, jsonb) IS
  'Replaces the extra limits of a service with p_limits, a JSON array of {name, kind: rate|rolling|calendar_day, max_count, window_ms, burst, time_zone}. A limit whose definition is unchanged keeps its state (no fresh burst). Raises ED005 for a bad limit (nothing is changed) and ED001 for an unknown service.';

CREATE FUNCTION edm.service_binding_limit(s edm.services, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (limit_name text, free_at timestamptz)
LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT x.limit_name, x.free_at FROM (
    SELECT 'interval'::text AS limit_name,
           edm.ts_add_ms(s.last_sent_at, s.interval_ms) AS free_at
    UNION ALL
    -- every column named: a SQL-standard body deparses an unnamed UNION column
    -- differently once reloaded (sql/schema.sql must build the same function)
    SELECT 'daily_quota'::text AS limit_name,
           edm.service_next_quota_day(s.quota_tz, coalesce(p_now, now())) AS free_at
    WHERE edm.service_sent_today(s, coalesce(p_now, now())) >= s.daily_quota
    UNION ALL
    SELECT l.name AS limit_name, edm.limit_next(l, coalesce(p_now, now()), s.quota_tz) AS free_at
    FROM edm.service_limits l WHERE l.service_id = s.service_id
  ) x
  WHERE x.free_at > coalesce(p_now, now())
  ORDER BY x.free_at DESC, x.limit_name
  LIMIT 1;
END;
COMMENT ON FUNCTION edm.service_binding_limit(edm.services, timestamptz) IS
  'The limit that holds service s back at p_now (interval, daily_quota or the name of an extra limit) and when it frees; no row when no limit does. With several, the one that frees last binds.';

CREATE VIEW edm.service_limit_status AS
-- the built-in interval: one send per interval_ms
SELECT s.service_id, s.name AS service_name, 'interval'::text AS limit_name, 'rate'::text AS kind,
       1 AS max_count, s.interval_ms AS window_ms, 1 AS burst,
       CASE WHEN s.last_sent_at > now() - s.interval_ms * interval '1 millisecond'
            THEN 1 ELSE 0 END AS used,
       CASE WHEN s.last_sent_at > now() - s.interval_ms * interval '1 millisecond'
            THEN 0 ELSE 1 END AS headroom,
       CASE WHEN s.last_sent_at > now() - s.interval_ms * interval '1 millisecond'
            THEN s.last_sent_at + s.interval_ms * interval '1 millisecond' END AS next_free_at
FROM edm.services s
WHERE s.interval_ms > 0
UNION ALL
-- the built-in daily quota, a calendar day in quota_tz
SELECT s.service_id, s.name, 'daily_quota', 'calendar_day', s.daily_quota, NULL::bigint, 1,
       edm.service_sent_today(s), greatest(s.daily_quota - edm.service_sent_today(s), 0),
       CASE WHEN edm.service_sent_today(s) >= s.daily_quota
            THEN edm.service_next_quota_day(s.quota_tz, now()) END
FROM edm.services s
UNION ALL
SELECT x.service_id, x.service_name, x.limit_name, x.kind, x.max_count, x.window_ms, x.burst,
       x.used, greatest(x.max_count - x.used, 0), x.next_free_at
FROM (
  SELECT s.service_id, s.name AS service_name, l.name AS limit_name, l.kind, l.max_count,
         l.window_ms, l.burst,
         CASE l.kind
           WHEN 'calendar_day' THEN CASE WHEN l.day = (now() AT TIME ZONE coalesce(l.time_zone, s.quota_tz))::date
                                         THEN l.day_count ELSE 0 END
           WHEN 'rolling' THEN (SELECT coalesce(sum(b.n), 0)::integer
                                FROM unnest(l.bucket_idx, l.bucket_n) AS b(i, n)
                                WHERE b.i >= edm.epoch_ms(now()) / edm.limit_bucket_ms(l.window_ms)
                                             - ceil(l.window_ms::numeric / edm.limit_bucket_ms(l.window_ms)))
           -- rate: sends still "in the bucket" (ceil((tat - now) / T), at most burst)
           ELSE least(l.burst, greatest(0, ceil(extract(epoch FROM (coalesce(l.tat, now()) - now())) * 1000
                                               / (l.window_ms::numeric / greatest(l.max_count, 1))))::integer)
         END AS used,
         nullif(edm.limit_next(l, now(), s.quota_tz), now()) AS next_free_at
  FROM edm.service_limits l JOIN edm.services s ON s.service_id = l.service_id
) x;
COMMENT ON VIEW edm.service_limit_status IS
  'Every limit of every service, built-in (interval, daily_quota) and extra (edm.service_limits), with its use, headroom and when it next admits a send (NULL: now). The limit with the latest next_free_at binds.';
COMMENT ON COLUMN edm.service_limit_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_limit_status.service_name IS 'Service name.';
COMMENT ON COLUMN edm.service_limit_status.limit_name IS 'interval, daily_quota, or the name of an extra limit.';
COMMENT ON COLUMN edm.service_limit_status.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.service_limit_status.max_count IS 'Most sends per window.';
COMMENT ON COLUMN edm.service_limit_status.window_ms IS 'Window in milliseconds (NULL for a calendar day).';
COMMENT ON COLUMN edm.service_limit_status.burst IS 'Most sends at once (rate limits).';
COMMENT ON COLUMN edm.service_limit_status.used IS 'Sends counted in the current window (rate: in the token bucket).';
COMMENT ON COLUMN edm.service_limit_status.headroom IS 'max_count - used, at least 0.';
COMMENT ON COLUMN edm.service_limit_status.next_free_at IS 'When the limit next admits a send; NULL when it does now.';

-- ---------------------------------------------------------------------------
-- The claim with slots (edm.claim_v2) and the old signature on top of it
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.claim_v2(
  p_owner text,
  p_batch integer DEFAULT 1,
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL,
  p_per_service integer DEFAULT 1,
  p_lookahead_ms integer DEFAULT NULL,
  p_skip_services bigint[] DEFAULT '{}')
RETURNS TABLE (
  subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text,
  contact_id bigint, template_idx smallint, vars jsonb, attempt smallint,
  send_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
-- Generic plans for every statement, from the first call. PL/pgSQL otherwise
-- re-plans a statement with its parameter values ("custom plans") while the
-- generic plan's estimate looks worse, which with array parameters it always
-- does: the small-pool lookup paid 0.5 ms of planning per execution (30 ms of
-- a 50 ms S2 claim), S1's claim 13-25 ms instead of 7. Every statement's
-- generic plan is checked by tests/sql/test_plan_regression.py.
SET plan_cache_mode = force_generic_plan
-- No JIT: the statements are sub-millisecond lookups, and a generic plan
-- whose estimate passes jit_above_cost would compile on every execution.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_svc   record;
  v_user  text;
  v_task  bigint;
  v_sub   bigint;
  v_prio  integer;
  v_task2 bigint;
  v_skip  text[] := '{}';
  v_tried bigint[];
  -- what this call claimed, one entry per subtask, in claim order
  c_svc   bigint[] := '{}';
  c_sub   bigint[] := '{}';
  c_task  bigint[] := '{}';
  c_user  text[] := '{}';
  -- rotation state of this call: served users / tasks, least recently served first
  r_users text[] := '{}';
  r_tasks bigint[] := '{}';
  v_seqs  bigint[];
  v_cands text[];
  v_pool  text[];
  v_small integer := edm.config_int('queue.small_pool_grantees');
  -- slots of this call: one per claimed subtask, in claim order
  c_slot  timestamptz[] := '{}';
  -- services found blocked by an extra limit before any slot, and until when
  b_svc   bigint[] := '{}';
  b_until timestamptz[] := '{}';
  v_horizon timestamptz;
  v_lead_at timestamptz;
  v_slot  timestamptz;
  v_k     integer;
  v_hold  interval := make_interval(secs => edm.config_int('queue.service_hold_seconds'));
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'claim: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_batch IS NULL OR p_batch NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: batch size must be between 1 and 1000, got %', p_batch
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lease_seconds IS NOT NULL AND p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'claim: lease must be between 1 and 86400 seconds, got %', p_lease_seconds
      USING ERRCODE = 'ED005';
  END IF;
  IF p_per_service IS NULL OR p_per_service NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: per-service batch must be between 1 and 1000, got %', p_per_service
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lookahead_ms IS NOT NULL AND p_lookahead_ms NOT BETWEEN 0 AND 60000 THEN
    RAISE EXCEPTION 'claim: lookahead must be between 0 and 60000 ms, got %', p_lookahead_ms
      USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));
  -- A service whose next slot comes within the lookahead may be claimed now:
  -- the dispatcher prepares the message and the connection, then starts the
  -- send at the slot.
  v_horizon := v_now + coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                       * interval '1 millisecond';
  -- The lead is counted from the server's clock as the claim runs (its own
  -- statements take time), or from p_now when the caller sets the clock.
  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';
  PERFORM edm.start_due_tasks(v_now);
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.claimable_tasks > 0) THEN
    RETURN;
  END IF;

  -- The head of the rotation, read once per call: the next users in line
  -- (least recently served first) with claimable work, locked for this call.
  -- Each service below takes the first of them it may serve; only when none
  -- fits (dedicated services, or all of them served already) does it fall
  -- back to walking the rotation index itself.
  v_cands := ARRAY(
    SELECT u.user_id FROM edm.users u
    WHERE u.claimable_tasks > 0
    ORDER BY u.last_served_seq, u.user_id
    LIMIT 2 * p_batch
    FOR UPDATE OF u SKIP LOCKED);

  -- Ready services (next slot within the horizon, under the daily quota,
  -- not held by another dispatcher, not one the caller has no room for),
  -- least used quota first.
  FOR v_svc IN
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits,
           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today
    FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
      AND s.service_id <> ALL (p_skip_services)
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP
    v_sub := NULL;
    -- The service's first slot: now, or its next available instant.
    v_slot := greatest(v_now, v_svc.next_available_at);
    -- ...no earlier than the lead for a paced service that was idle (see
    -- queue.slot_lead_ms): the dispatcher cannot start it sooner.
    IF (v_svc.interval_ms > 0 OR v_svc.has_limits) AND v_slot < v_lead_at THEN
      v_slot := v_lead_at;
    END IF;
    v_k := 0;
    -- A small pool (a dedicated service, a group's few accounts) is looked up
    -- from its own grants; a large one from the head of the global rotation,
    -- where nearly every user has a grant. Both find the same user. A pool is
    -- small when it has no grant past the first queue.small_pool_grantees (an
    -- index-only probe of a leaf page or two): a test that cannot go stale,
    -- unlike a count kept by triggers (bulk loads and replicas run without).
    -- Every lookup leaves out users with a ready service on a higher-priority
    -- grant (grant tiers; a service claimed earlier in this call is busy
    -- unless it has no interval). That check reads the user's few
    -- higher-priority grants and each one's service by primary key, in a
    -- scalar subquery: as a join, a generic plan may instead walk every ready
    -- service per candidate (2 ms a lookup on a freshly loaded 1,000-service
    -- world, found by python -m benchmarks claimprofile).
    v_pool := NULL;
    IF NOT EXISTS (SELECT 1 FROM edm.grants g WHERE g.service_id = v_svc.service_id
                   OFFSET v_small) THEN
      -- The pool's users with work, in rotation order. Read by primary key
      -- (= ANY): walking users_rotation_idx for the few users of a pool, what
      -- a planner may pick for an ORDER BY on it, costs O(users).
      v_pool := ARRAY(SELECT g.user_id FROM edm.grants g WHERE g.service_id = v_svc.service_id);
      v_pool := ARRAY(SELECT u.user_id FROM edm.users u
                      WHERE u.user_id = ANY (v_pool) AND u.claimable_tasks > 0
                      ORDER BY u.last_served_seq, u.user_id);
    END IF;
    -- One iteration per slot: a service whose limits allow several sends
    -- within the horizon (a burst, or no interval) takes up to p_per_service,
    -- each to the next user in the fair order (r_users rotates).
    <<slots>>
    LOOP
    v_sub := NULL;
    IF v_svc.has_limits THEN
      v_slot := edm.limits_next(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    IF v_slot > v_horizon THEN
      IF v_k = 0 THEN  -- an extra limit blocks the service beyond the horizon
        b_svc := b_svc || v_svc.service_id;
        b_until := b_until || v_slot;
      END IF;
      EXIT slots;
    END IF;
    EXIT slots WHEN v_svc.sent_today + v_k >= v_svc.daily_quota;
    LOOP
      v_user := NULL;
      -- The first user of the list (the small pool in rotation order, or the
      -- rotation head, already locked) who has a grant here and no ready
      -- higher-tier service, each probed by a scalar subquery: as an EXISTS
      -- it would become a semi-join, which a planner may hash over all the
      -- service's grants instead of stopping at the first that fits.
      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)
      WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
        AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                             AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                             AND (s2.service_id <> ALL (c_svc)
                                  OR (s2.interval_ms = 0
                                      AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                     FROM edm.services s2 WHERE s2.service_id = g2.service_id))
          LIMIT 1)
      ORDER BY c.n
      LIMIT 1;
      IF v_user IS NOT NULL AND v_pool IS NOT NULL THEN
        -- A pool's users are not locked yet; one locked by another claim is
        -- being served: leave it out and look again.
        PERFORM 1 FROM edm.users u
        WHERE u.user_id = v_user AND u.claimable_tasks > 0
        FOR UPDATE OF u SKIP LOCKED;
        IF NOT FOUND THEN
          v_skip := v_skip || v_user;
          CONTINUE;
        END IF;
      END IF;
      -- Large pool and nobody in the head fits: walk the rotation further.
      IF v_user IS NULL AND v_pool IS NULL THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.claimable_tasks > 0
          AND u.user_id <> ALL (v_cands)
          AND u.user_id <> ALL (v_skip)
          AND u.user_id <> ALL (r_users)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                               AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                               AND (s2.service_id <> ALL (c_svc)
                                    OR (s2.interval_ms = 0
                                        AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY u.last_served_seq, u.user_id
        LIMIT 1
        FOR UPDATE OF u SKIP LOCKED;
      END IF;
      -- ...then (the rotation wraps around) those served in this call, in serve order.
      IF v_user IS NULL AND cardinality(r_users) > 0 THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.user_id = ANY (r_users) AND u.user_id <> ALL (v_skip)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                               AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                               AND (s2.service_id <> ALL (c_svc)
                                    OR (s2.interval_ms = 0
                                        AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY array_position(r_users, u.user_id)
        LIMIT 1;
      END IF;
      EXIT WHEN v_user IS NULL;

      v_tried := '{}';
      LOOP
        -- The user's best task not served in this call (priority, then rotation)...
        v_task := NULL;
        SELECT t.task_id, t.priority INTO v_task, v_prio FROM edm.tasks t
        WHERE t.user_id = v_user AND t.claimable
          AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (r_tasks)
        ORDER BY t.priority DESC, t.last_served_seq, t.task_id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        -- ...unless a task served in this call has a higher priority (or there is no other).
        IF c_user @> ARRAY[v_user] THEN
          SELECT t.task_id INTO v_task2 FROM edm.tasks t
          WHERE t.task_id = ANY (r_tasks) AND t.user_id = v_user AND t.claimable
            AND t.task_id <> ALL (v_tried)
            AND (v_task IS NULL OR t.priority > v_prio)
          ORDER BY t.priority DESC, array_position(r_tasks, t.task_id)
          LIMIT 1;
          v_task := coalesce(v_task2, v_task);
        END IF;
        EXIT WHEN v_task IS NULL;
        -- Due retries first (I9: a retry goes at its due time, not behind
        -- its task's fresh recipients), then the lowest fresh or returned
        -- recipient (not_before = -infinity). Both walk subtasks_claim_idx.
        SELECT st.subtask_id INTO v_sub
        FROM edm.subtasks st
        WHERE st.task_id = v_task AND st.status = 'pending'
          AND st.not_before > '-infinity' AND st.not_before <= v_now
          AND st.subtask_id <> ALL (c_sub)
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        IF v_sub IS NULL THEN
          SELECT st.subtask_id INTO v_sub
          FROM edm.subtasks st
          WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before = '-infinity'
            AND st.subtask_id <> ALL (c_sub)
          ORDER BY st.not_before, st.subtask_id
          LIMIT 1
          FOR UPDATE OF st SKIP LOCKED;
        END IF;
        EXIT WHEN v_sub IS NOT NULL;
        v_tried := v_tried || v_task;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      v_skip := v_skip || v_user;
    END LOOP;
    EXIT slots WHEN v_sub IS NULL;

    c_svc := c_svc || v_svc.service_id;
    c_sub := c_sub || v_sub;
    c_task := c_task || v_task;
    c_user := c_user || v_user;
    c_slot := c_slot || v_slot;
    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;
    IF v_svc.has_limits THEN
      PERFORM edm.limits_take(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    v_k := v_k + 1;
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
    END LOOP slots;
    EXIT WHEN cardinality(c_sub) >= p_batch;
  END LOOP;

  -- Services an extra limit blocks: out of the ready set until it frees.
  IF cardinality(b_svc) > 0 THEN
    UPDATE edm.services s SET quota_exhausted_until = b.until
    FROM unnest(b_svc, b_until) AS b(service_id, until)
    WHERE s.service_id = b.service_id AND s.service_id = ANY (b_svc);
  END IF;

  IF cardinality(c_sub) = 0 THEN
    RETURN;
  END IF;

  -- One statement per table for the whole batch (each row is already locked).
  SELECT array_agg(nextval('edm.serve_seq') ORDER BY i) INTO v_seqs
  FROM generate_series(1, cardinality(c_sub)) i;

  -- Each claimed service: its latest slot starts the interval, its slots
  -- count against the daily quota, the claimer holds it, and the time an
  -- exhausted quota or extra limit next admits a send keeps it out of the
  -- ready set until then.
  UPDATE edm.services s
  SET last_sent_at = a.last_slot,
      sent_today = CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END,
      quota_day = (v_now AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until =
        CASE WHEN (CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END) >= s.daily_quota
               THEN edm.service_next_quota_day(s.quota_tz, v_now)
             WHEN s.has_limits
               THEN nullif(edm.limits_next(s.service_id, a.last_slot, s.quota_tz), a.last_slot) END,
      -- a service with nothing to pace (no interval, no extra limit) is not held
      held_by = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN p_owner END,
      held_until = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN a.last_slot + v_hold END
  FROM (SELECT x.service_id, count(*)::integer AS n, max(x.slot) AS last_slot
        FROM unnest(c_svc, c_slot) AS x(service_id, slot) GROUP BY x.service_id) a
  WHERE s.service_id = a.service_id
    AND s.service_id = ANY (c_svc);  -- redundant: lets every plan start from services_pkey

  UPDATE edm.tasks t
  SET pending_count = t.pending_count - a.n,
      leased_count = t.leased_count + a.n,
      last_served_seq = a.seq,
      last_activity_at = v_now,
      first_claimed_at = coalesce(t.first_claimed_at, v_now),
      stuck_since = NULL
  FROM (SELECT x.task_id, count(*) AS n, max(x.seq) AS seq
        FROM unnest(c_task, v_seqs) AS x(task_id, seq) GROUP BY x.task_id) a
  WHERE t.task_id = a.task_id
    AND t.task_id = ANY (c_task);  -- redundant: lets every plan start from tasks_pkey

  UPDATE edm.users u SET last_served_seq = a.seq, last_served_at = v_now
  FROM (SELECT x.user_id, max(x.seq) AS seq
        FROM unnest(c_user, v_seqs) AS x(user_id, seq) GROUP BY x.user_id) a
  WHERE u.user_id = a.user_id
    AND u.user_id = ANY (c_user);  -- redundant: lets every plan start from users_pkey

  -- Rows in claim order (the order of the services), as the row-by-row version returned them.
  RETURN QUERY
  WITH leased AS (
    UPDATE edm.subtasks st
    SET status = 'leased', lease_owner = p_owner, leased_at = x.slot,
        lease_expires_at = x.slot + v_lease, service_id = x.service_id,
        attempts = st.attempts + 1
    FROM unnest(c_sub, c_svc, c_user, c_slot) AS x(subtask_id, service_id, user_id, slot)
    WHERE st.subtask_id = x.subtask_id
    RETURNING st.subtask_id, st.task_id, x.user_id, st.service_id, st.email, st.contact_id,
              st.template_idx, st.vars, st.attempts, st.leased_at, st.lease_expires_at
  )
  SELECT l.subtask_id, l.task_id, l.user_id, l.service_id, l.email, l.contact_id,
         l.template_idx, l.vars, l.attempts, l.leased_at, l.lease_expires_at
  FROM leased l JOIN unnest(c_sub) WITH ORDINALITY AS o(id, n) ON o.id = l.subtask_id
  ORDER BY o.n;
END;
$$;
COMMENT ON FUNCTION edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[]) IS
  'Claims up to p_batch subtasks in one transaction and hands each its slot (send_at: the instant its send may start). For each ready service (next slot within p_lookahead_ms, default queue.slot_lookahead_ms; under its daily quota and every extra limit; not held by another dispatcher; not in p_skip_services), lowest quota share first: up to p_per_service slots, one interval apart and within every limit, each to the least recently served user with work and a grant, that user''s least recently served task (priority first), and its due retry or else its lowest pending subtask. Leases each from its slot for p_lease_seconds, counts the slots against the limits and holds the service for the claimer. Never waits on a lock.';

CREATE OR REPLACE FUNCTION edm.claim(
  p_owner text,
  p_batch integer DEFAULT 1,
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (
  subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text,
  contact_id bigint, template_idx smallint, vars jsonb, attempt smallint,
  leased_at timestamptz, lease_expires_at timestamptz)
LANGUAGE sql
BEGIN ATOMIC
  SELECT c.subtask_id, c.task_id, c.user_id, c.service_id, c.email, c.contact_id,
         c.template_idx, c.vars, c.attempt, c.send_at, c.lease_expires_at
  FROM edm.claim_v2(p_owner, p_batch, p_lease_seconds, p_now, 1, 0, '{}') c;
END;
COMMENT ON FUNCTION edm.claim(text, integer, integer, timestamptz) IS
  'The claim of dispatchers before slots (kept for rolling upgrades and host loops): edm.claim_v2 with one slot per service and no lookahead, so every slot is now. Limits, holds and due-retries-first apply as in claim_v2.';

-- ---------------------------------------------------------------------------
-- Completion: uncertain and render_error outcomes
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.complete(
  p_owner text,
  p_subtask_ids bigint[],
  p_outcomes text[],
  p_codes integer[] DEFAULT NULL,
  p_details text[] DEFAULT NULL,
  p_response_ms integer[] DEFAULT NULL,
  p_provider_ids text[] DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (subtask_id bigint, accepted boolean, status text, reason text)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_n    integer := cardinality(p_subtask_ids);
  v_max_attempts integer := edm.config_int('queue.max_attempts');
  v_retry_base   integer := edm.config_int('queue.pending_retry_interval');
  v_retry_max    integer := edm.config_int('queue.retry_backoff_max');
  v_svc_base     integer := edm.config_int('service.backoff_base');
  v_svc_max      integer := edm.config_int('service.backoff_max');
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'complete: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN;
  END IF;
  IF v_n > 10000
     OR cardinality(p_outcomes) IS DISTINCT FROM v_n
     OR (p_codes IS NOT NULL AND cardinality(p_codes) <> v_n)
     OR (p_details IS NOT NULL AND cardinality(p_details) <> v_n)
     OR (p_response_ms IS NOT NULL AND cardinality(p_response_ms) <> v_n)
     OR (p_provider_ids IS NOT NULL AND cardinality(p_provider_ids) <> v_n) THEN
    RAISE EXCEPTION 'complete: argument arrays must all have the same length (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_outcomes) o
             WHERE o IS NULL OR o NOT IN ('sent', 'transient', 'permanent', 'service', 'released',
                                          'uncertain', 'render_error')) THEN
    RAISE EXCEPTION 'complete: outcome must be sent, transient, permanent, service, released, uncertain or render_error'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT i) FROM unnest(p_subtask_ids) i) <> v_n
     OR array_position(p_subtask_ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'complete: subtask ids must be distinct and not null' USING ERRCODE = 'ED005';
  END IF;

  -- Lock in the global order: subtasks, services, tasks (see the header).
  PERFORM 1 FROM edm.subtasks st WHERE st.subtask_id = ANY (p_subtask_ids)
  ORDER BY st.subtask_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.services s
  WHERE s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased')
  ORDER BY s.service_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st
                      WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased')
  ORDER BY t.task_id FOR NO KEY UPDATE;
  -- Owners of cancelled tasks get the quota of subtasks that end cancelled
  -- back (refund_users below): lock them last, in id order.
  PERFORM 1 FROM edm.users u
  WHERE u.user_id IN (SELECT t.user_id FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
                      WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
                        AND t.status = 'cancelled')
  ORDER BY u.user_id FOR NO KEY UPDATE;

  RETURN QUERY
  WITH input AS (
    SELECT i.subtask_id, i.outcome, i.code, left(i.detail, 2000) AS detail, i.response_ms,
           left(i.provider_id, 500) AS provider_id
    FROM unnest(p_subtask_ids, p_outcomes,
                coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(p_response_ms, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_provider_ids, array_fill(NULL::text, ARRAY[v_n])))
         AS i(subtask_id, outcome, code, detail, response_ms, provider_id)
  ),
  -- What each completion does. Only the lease holder, before expiry, may
  -- complete; anything else is rejected (and recorded when the subtask exists).
  plan AS (
    SELECT i.*, st.task_id, st.service_id, st.attempts, st.email, st.leased_at,
           st.status AS old_status, t.user_id, t.status AS task_status,
           (st.subtask_id IS NOT NULL AND st.status = 'leased' AND st.lease_owner = p_owner
            AND st.lease_expires_at > v_now) AS ok,
           CASE
             WHEN st.subtask_id IS NULL THEN 'unknown subtask'
             WHEN st.status <> 'leased' THEN 'subtask is ' || st.status || ', not leased'
             WHEN st.lease_owner <> p_owner THEN 'leased by another dispatcher'
             WHEN st.lease_expires_at <= v_now THEN 'lease expired at ' || st.lease_expires_at
           END AS reject_reason,
           CASE i.outcome
             WHEN 'sent' THEN 'sent'
             WHEN 'permanent' THEN 'failed'
             WHEN 'render_error' THEN 'failed'
             WHEN 'transient' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             -- the connection was lost after the final dot: retried like a
             -- transient failure, and recorded as a possible duplicate
             WHEN 'uncertain' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             ELSE CASE WHEN t.status = 'cancelled' THEN 'cancelled' ELSE 'pending' END
           END AS new_status,
           -- service, released and render_error outcomes did not send: give the
           -- quota back when the claim counted it on the service's current quota day.
           (i.outcome IN ('service', 'released', 'render_error')
            AND (st.leased_at AT TIME ZONE s.quota_tz)::date = s.quota_day) AS refund_quota
    FROM input i
    LEFT JOIN edm.subtasks st ON st.subtask_id = i.subtask_id
    LEFT JOIN edm.tasks t ON t.task_id = st.task_id
    LEFT JOIN edm.services s ON s.service_id = st.service_id
  ),
  upd_services AS (
    UPDATE edm.services s
    SET total_sent = s.total_sent + a.n_sent,
        total_failed = s.total_failed + a.n_failed,
        avg_response_ms = CASE WHEN a.avg_ms IS NULL THEN s.avg_response_ms
                               WHEN s.avg_response_ms IS NULL THEN a.avg_ms
                               ELSE s.avg_response_ms * 0.8 + a.avg_ms * 0.2 END,
        sent_today = greatest(s.sent_today - a.n_refund, 0),
        quota_exhausted_until = CASE WHEN a.n_refund > 0 THEN NULL ELSE s.quota_exhausted_until END,
        consecutive_failures = CASE WHEN a.n_service > 0 THEN s.consecutive_failures + a.n_service
                                    WHEN a.n_sent > 0 THEN 0 ELSE s.consecutive_failures END,
        backoff_until = CASE WHEN a.n_service > 0
          THEN v_now + make_interval(secs => least(v_svc_max::double precision,
                 v_svc_base * power(2, least(s.consecutive_failures + a.n_service - 1, 30))))
          ELSE s.backoff_until END,
        health = CASE WHEN a.n_service > 0 THEN 'backoff'
                      WHEN a.n_sent > 0 AND a.n_failed = 0 THEN 'healthy'
                      WHEN a.n_failed > 0 THEN 'degraded'
                      ELSE s.health END,
        last_error = CASE WHEN a.n_service > 0 THEN a.last_service_error ELSE s.last_error END
    FROM (
      SELECT p.service_id,
             count(*) FILTER (WHERE p.outcome = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.outcome IN ('transient', 'permanent', 'uncertain')) AS n_failed,
             count(*) FILTER (WHERE p.outcome = 'service') AS n_service,
             count(*) FILTER (WHERE p.refund_quota) AS n_refund,
             avg(p.response_ms) FILTER (WHERE p.outcome = 'sent') AS avg_ms,
             max(p.detail) FILTER (WHERE p.outcome = 'service') AS last_service_error
      FROM plan p WHERE p.ok GROUP BY p.service_id
    ) a
    WHERE s.service_id = a.service_id
  ),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET leased_count = t.leased_count - a.n,
        sent_count = t.sent_count + a.n_sent,
        failed_count = t.failed_count + a.n_failed,
        pending_count = t.pending_count + a.n_pending,
        cancelled_count = t.cancelled_count + a.n_cancelled,
        quota_reserved = greatest(t.quota_reserved - a.n_sent - a.n_failed - a.n_cancelled, 0),
        last_activity_at = v_now,
        stuck_since = NULL,
        status = CASE WHEN t.status = 'sending' AND t.pending_count + a.n_pending = 0
                           AND t.leased_count - a.n = 0 THEN 'completed'
                      ELSE t.status END
    FROM (
      SELECT p.task_id, count(*) AS n,
             count(*) FILTER (WHERE p.new_status = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.new_status = 'failed') AS n_failed,
             count(*) FILTER (WHERE p.new_status = 'pending') AS n_pending,
             count(*) FILTER (WHERE p.new_status = 'cancelled') AS n_cancelled
      FROM plan p WHERE p.ok GROUP BY p.task_id
    ) a
    WHERE t.task_id = a.task_id
  ),
  -- A subtask that ends cancelled (its task was cancelled while it was
  -- leased) was never sent: its quota goes back to the user, as cancel_task
  -- does for the pending ones.
  refund_users AS (
    UPDATE edm.users u SET quota_used = u.quota_used - a.n
    FROM (SELECT p.user_id, count(*) AS n FROM plan p
          WHERE p.ok AND p.new_status = 'cancelled' GROUP BY p.user_id) a
    WHERE u.user_id = a.user_id
  ),
  upd_subtasks AS (
    UPDATE edm.subtasks st
    SET status = p.new_status,
        lease_owner = NULL,
        lease_expires_at = NULL,
        attempts = CASE WHEN p.outcome IN ('service', 'released', 'render_error')
                        THEN greatest(st.attempts - 1, 0) ELSE st.attempts END,
        uncertain_sends = st.uncertain_sends + CASE WHEN p.outcome = 'uncertain' THEN 1 ELSE 0 END,
        not_before = CASE
          WHEN p.new_status = 'pending' AND p.outcome IN ('transient', 'uncertain')
            THEN v_now + make_interval(secs => least(v_retry_max::double precision,
                                                     v_retry_base * power(2, least(st.attempts - 1, 30))))
          -- not sent (service failure, release): back to its place in line
          WHEN p.new_status = 'pending' THEN '-infinity'
          ELSE st.not_before END,
        outcome_code = coalesce(p.code, st.outcome_code),
        outcome_detail = CASE WHEN p.new_status = 'failed' AND p.outcome IN ('transient', 'uncertain')
                              THEN 'gave up after ' || st.attempts || ' attempts: ' || coalesce(p.detail, '')
                              ELSE coalesce(p.detail, st.outcome_detail) END,
        provider_message_id = coalesce(p.provider_id, st.provider_message_id),
        finished_at = CASE WHEN p.new_status IN ('sent', 'failed', 'cancelled') THEN v_now END
    FROM plan p
    WHERE st.subtask_id = p.subtask_id AND p.ok
  ),
  events AS (
    INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                                 attempt, started_at, code, response_ms, dispatcher, detail)
    SELECT v_now, p.subtask_id, p.task_id, p.user_id, p.service_id,
           CASE WHEN NOT p.ok THEN 'late_completion'
                WHEN p.outcome = 'sent' THEN 'sent'
                WHEN p.outcome = 'service' THEN 'service_failure'
                WHEN p.outcome = 'released' THEN 'released'
                WHEN p.outcome = 'uncertain' THEN 'uncertain'
                WHEN p.outcome = 'render_error' THEN 'render_error'
                WHEN p.new_status = 'failed' THEN 'failed'
                WHEN p.new_status = 'cancelled' THEN 'cancelled'
                ELSE 'retry' END,
           p.attempts, p.leased_at, p.code, p.response_ms, p_owner,
           CASE WHEN p.ok THEN p.detail ELSE p.reject_reason || ' (reported ' || p.outcome || ')' END
    FROM plan p
    WHERE p.task_id IS NOT NULL
  ),
  suppress AS (
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id)
    SELECT DISTINCT ON (p.email) NULL::text, p.email, 'hard_bounce', p.subtask_id
    FROM plan p
    WHERE p.ok AND p.outcome = 'permanent' AND edm.smtp_code_suppresses(p.code)
    ORDER BY p.email, p.subtask_id
    ON CONFLICT DO NOTHING
  )
  SELECT p.subtask_id, p.ok, CASE WHEN p.ok THEN p.new_status ELSE p.old_status END, p.reject_reason
  FROM plan p;
END;
$$;
COMMENT ON FUNCTION edm.complete(text, bigint[], text[], integer[], text[], integer[], text[], timestamptz) IS
  'Records the outcomes of claimed subtasks in one transaction, fenced by the lease: only p_owner, before the lease expires, may complete. Outcomes: sent; transient (retry with back-off, failed after queue.max_attempts); uncertain (the connection was lost or timed out after the final dot: retried like transient, counted in uncertain_sends and recorded as an uncertain event, so a resend is a counted possible duplicate); permanent (failed; address suppressed for 550/551/553); render_error (the message could not be built: failed, no attempt and no quota unit spent); service (the service backs off, the subtask returns to pending without using an attempt); released (unsent, e.g. its lease would end before its send could start, or shutdown). Task counters, service statistics, send_events and (for subtasks of a cancelled task, which end cancelled) the refund of the owner''s quota change together; rejected completions are returned with a reason and recorded as late_completion.';

-- ---------------------------------------------------------------------------
-- Leases kept alive while the transport waits; holds
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.renew_leases(
  p_owner text,
  p_subtask_ids bigint[],
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (subtask_id bigint, lease_expires_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_hold  interval := make_interval(secs => edm.config_int('queue.service_hold_seconds'));
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'renew_leases: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_lease_seconds IS NOT NULL AND p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'renew_leases: lease must be between 1 and 86400 seconds, got %', p_lease_seconds
      USING ERRCODE = 'ED005';
  END IF;
  IF cardinality(p_subtask_ids) > 10000 THEN
    RAISE EXCEPTION 'renew_leases: at most 10000 subtasks per call' USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));
  -- Lock order of the header of 0002: subtasks, then services by id.
  PERFORM 1 FROM edm.subtasks st WHERE st.subtask_id = ANY (p_subtask_ids)
  ORDER BY st.subtask_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.services s
  WHERE s.held_by = p_owner
    AND s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids))
  ORDER BY s.service_id FOR NO KEY UPDATE;
  UPDATE edm.services s SET held_until = greatest(s.held_until, v_now + v_hold)
  WHERE s.held_by = p_owner
    AND s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
                           AND st.lease_owner = p_owner AND st.lease_expires_at > v_now);
  -- Fenced like a completion: only the holder's live leases are extended;
  -- one that already ran out stays expired (the sweep records it).
  RETURN QUERY
  UPDATE edm.subtasks st SET lease_expires_at = greatest(st.lease_expires_at, v_now + v_lease)
  WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
    AND st.lease_owner = p_owner AND st.lease_expires_at > v_now
  RETURNING st.subtask_id, st.lease_expires_at;
END;
$$;
COMMENT ON FUNCTION edm.renew_leases(text, bigint[], integer, timestamptz) IS
  'Keeps leases alive while their sends wait on a slow provider: extends each of p_owner''s live leases among p_subtask_ids to now + p_lease_seconds (default queue.service_reservation_timeout), and p_owner''s holds of their services to now + queue.service_hold_seconds. Returns the leases still held with their new expiry; a lease that already expired is not revived (nothing may be sent on it).';

CREATE FUNCTION edm.release_holds(p_owner text, p_service_ids bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.services s SET held_by = NULL, held_until = NULL
  WHERE s.service_id IN (SELECT x.service_id FROM edm.services x WHERE x.held_by = p_owner
                           AND (p_service_ids IS NULL OR x.service_id = ANY (p_service_ids))
                         ORDER BY x.service_id FOR NO KEY UPDATE);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.release_holds(text, bigint[]) IS
  'Ends the holds of dispatcher p_owner on services p_service_ids (default: all of them, at shutdown), so others may claim them at once: a dispatcher releases the services whose lanes ran empty while it has no room to claim. Returns how many were released.';

CREATE FUNCTION edm.report_pace(p_owner text, p_service_ids bigint[], p_next_starts timestamptz[])
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  IF cardinality(p_service_ids) IS DISTINCT FROM cardinality(p_next_starts)
     OR cardinality(p_service_ids) > 10000 THEN
    RAISE EXCEPTION 'report_pace: service ids and next starts must pair up (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  -- Only services p_owner holds, and only later: the next slot can move back
  -- never, so no limit can be broken by a report.
  UPDATE edm.services s
  SET last_sent_at = greatest(s.last_sent_at, x.next_start - s.interval_ms * interval '1 millisecond')
  FROM (SELECT y.service_id, y.next_start FROM unnest(p_service_ids, p_next_starts)
          AS y(service_id, next_start)
        ORDER BY y.service_id) x
  WHERE s.service_id = x.service_id AND s.held_by = p_owner
    AND s.service_id IN (SELECT z.service_id FROM edm.services z
                         WHERE z.service_id = ANY (p_service_ids) AND z.held_by = p_owner
                         ORDER BY z.service_id FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.report_pace(text, bigint[], timestamptz[]) IS
  'A dispatcher whose lane of a held service runs late (its sends start after their slots: a stalled event loop, a slow server) tells when the service''s next send can really start; the service''s next slot moves there (never earlier), so slots claimed afterwards follow the wire instead of piling up lateness. Services not held by p_owner, or locked by a claim, are left alone. Returns how many moved.';

CREATE FUNCTION edm.next_wakeup_v2(p_owner text, p_now timestamptz DEFAULT NULL,
                                   p_lookahead_ms integer DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_look interval := coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                     * interval '1 millisecond';
  v_at   timestamptz;
BEGIN
  v_at := least(
    -- Walk services_ready_idx in time order and stop at the first service
    -- this dispatcher may claim (not held by another) that some user with
    -- work may use; it becomes claimable a lookahead before its slot.
    (SELECT s.next_available_at - v_look FROM edm.services s
     WHERE s.enabled AND s.daily_quota > 0
       AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
            WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)
     ORDER BY s.next_available_at LIMIT 1),
    -- Services held by others: claimable by us when the hold ends.
    (SELECT min(s.held_until) FROM edm.services s
     WHERE s.enabled AND s.held_until > v_now AND s.held_by <> p_owner
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
            WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)),
    (SELECT min(t.scheduled_at) FROM edm.tasks t WHERE t.status = 'scheduled'),
    (SELECT min(st.lease_expires_at) FROM edm.subtasks st WHERE st.status = 'leased'));
  IF v_at IS NULL THEN
    RETURN NULL;  -- nothing is waiting
  END IF;
  RETURN greatest(v_at, v_now);
END;
$$;
COMMENT ON FUNCTION edm.next_wakeup_v2(text, timestamptz, integer) IS
  'For dispatcher p_owner: the earliest time a claim_v2 or a lease expiry could next have work (a service with work coming within the slot lookahead, a hold of another dispatcher ending, a scheduled task starting, a lease expiring). NULL when nothing is waiting.';

-- ---------------------------------------------------------------------------
-- Possible duplicates, in one query
-- ---------------------------------------------------------------------------

CREATE VIEW edm.possible_duplicates AS
SELECT st.subtask_id, st.task_id, t.user_id, st.email, st.status, st.service_id,
       st.lease_expiries, st.uncertain_sends,
       st.lease_expiries + st.uncertain_sends AS uncertain_attempts
FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
WHERE st.lease_expiries > 0 OR st.uncertain_sends > 0;
COMMENT ON VIEW edm.possible_duplicates IS
  'Every subtask that may have reached its recipient more than once (I1): one of its attempts ended with an outcome nobody can know, a lease that expired on a crashed or cut-off dispatcher (lease_expiries) or a connection lost after the final dot (uncertain_sends), and it was or may be sent again. Each such attempt was recorded (send_events kinds lease_expired and uncertain) before any resend.';
COMMENT ON COLUMN edm.possible_duplicates.subtask_id IS 'Subtask.';
COMMENT ON COLUMN edm.possible_duplicates.task_id IS 'Task.';
COMMENT ON COLUMN edm.possible_duplicates.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.possible_duplicates.email IS 'Recipient.';
COMMENT ON COLUMN edm.possible_duplicates.status IS 'Current status of the subtask.';
COMMENT ON COLUMN edm.possible_duplicates.service_id IS 'Service of the latest attempt.';
COMMENT ON COLUMN edm.possible_duplicates.lease_expiries IS 'Leases that expired (outcome unknown).';
COMMENT ON COLUMN edm.possible_duplicates.uncertain_sends IS 'Connections lost after the final dot.';
COMMENT ON COLUMN edm.possible_duplicates.uncertain_attempts IS 'lease_expiries + uncertain_sends: the most extra copies the recipient may have.';

-- ---------------------------------------------------------------------------
-- Roles: the new functions and views
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.install_roles(p_dispatcher text DEFAULT 'edm_dispatcher',
                                  p_app text DEFAULT 'edm_app',
                                  p_monitor text DEFAULT 'edm_monitor')
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_role text;
  f regprocedure;
  -- What each role may EXECUTE (every overload of these names).
  v_dispatcher_fns text[] := ARRAY[
    'claim', 'complete', 'expire_leases', 'next_wakeup', 'run_sweeps', 'take_alerts',
    'start_due_tasks', 'task_wait_reason', 'service_is_ready', 'service_sent_today',
    'job_claim', 'job_fire', 'job_finish', 'job_progress', 'job_schedule_retry',
    'job_expire_runs', 'job_next_wakeup', 'job_purge_executions', 'job_due', 'job_set_next_run',
    'claim_v2', 'renew_leases', 'release_holds', 'next_wakeup_v2', 'report_pace'];
  v_app_fns text[] := ARRAY[
    'upsert_user', 'set_user_quota', 'create_service', 'update_service', 'grant_service',
    'revoke_service', 'merge_staged_contacts', 'set_contact_tags', 'delete_tag',
    'add_suppression', 'remove_suppression', 'create_task_from_staged', 'create_task_from_rule',
    'expand_task', 'pause_task', 'resume_task', 'cancel_task', 'task_wait_reason', 'config_set',
    'share_staged', 'email_problem', 'is_valid_email', 'normalize_email', 'is_valid_timezone',
    'rule_matches', 'service_sent_today', 'service_is_ready',
    'job_create', 'job_update', 'job_delete', 'job_trigger', 'job_pause', 'job_resume',
    'job_stop', 'job_cancel_execution', 'job_validate', 'set_service_limits'];
  v_monitor_fns text[] := ARRAY['task_wait_reason', 'service_sent_today', 'service_is_ready'];
BEGIN
  FOREACH v_role IN ARRAY ARRAY[p_dispatcher, p_app, p_monitor] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = v_role) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA edm TO %I', v_role);
  END LOOP;

  -- Monitoring: read everything, change nothing.
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA edm TO %I', p_monitor);

  -- Dispatcher: claim / complete / sweep through functions; read what
  -- rendering needs; keep its own heartbeat row.
  EXECUTE format('GRANT SELECT ON edm.services, edm.templates, edm.contacts, edm.config, '
                 'edm.tasks, edm.system_health, edm.jobs, edm.job_executions TO %I', p_dispatcher);
  EXECUTE format('GRANT SELECT, INSERT, UPDATE ON edm.dispatchers TO %I', p_dispatcher);

  -- Host application: everything through functions; read its objects.
  EXECUTE format('GRANT SELECT ON edm.users, edm.services, edm.grants, edm.tasks, edm.templates, '
                 'edm.config, edm.task_progress, edm.service_status, edm.system_health, '
                 'edm.task_wait_reasons, edm.alerts, edm.jobs, edm.job_executions, '
                 'edm.jobs_overview, edm.service_limits, edm.service_limit_status, '
                 'edm.possible_duplicates TO %I', p_app);

  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_dispatcher_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_dispatcher);
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_app_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_app);
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_monitor_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_monitor);
  END LOOP;
END;
$$;

SELECT edm.harden_functions();
-- next_wakeup_v2 reads grants and users, which the dispatcher role may not:
-- like next_wakeup, it runs with the schema owner's rights.
ALTER FUNCTION edm.next_wakeup_v2(text, timestamptz, integer)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
