-- 0022_shaped_claim_cost: the shaped claim's cost (issue 15 point 6), the
-- skip of a blocked site's recipients, the sweep that trims the reply-rule
-- log, and limits that keep their count when only their maximum changes.
--
--   * subtasks.domain: the recipient's domain, stored (a generated column),
--     and subtasks_domain_idx (task, domain, claim order) over pending rows.
--     The claim leaves out the recipients of suspended or full sites by
--     their domain (a site is the set of domains edm.site_domains maps to
--     it, read at the claim: a mapping added later still applies to queued
--     recipients) instead of computing each candidate's site from its
--     address. edm.claim_next_subtask finds a task's next recipient outside
--     those domains without walking them: it probes the first 64 in claim
--     order, then jumps from domain to domain on subtasks_domain_idx.
--   * edm.claim_v2 (same signature, same decisions): the batched fill of
--     0014 now serves shaped services too. It checks every layer (global,
--     user, task, site, service_site) at each of its slots, after reading
--     the limits of all its scopes in one statement; the first slot a limit
--     holds back ends the fill and the slot-by-slot loop decides it. A
--     service transactional work may use still goes slot by slot.
--   * edm.limit_after adds a rolling limit's send on its arrays in
--     PL/pgSQL: edm.rolling_buckets_add, a query, was planned again on each
--     call (0.35 ms a send, a third of a shaped claim's time).
--     edm.shaping_load probes the primary key once per scope (the planner
--     scanned the small table whole), edm.shaping_free looks up the
--     positions of the scopes' limits instead of walking every limit read.
--   * edm.set_service_limits and the shaping setters (edm.shaping_replace)
--     change a limit's max_count in place: its count, buckets and arrival
--     time are kept, so a limit raised or lowered mid-day still counts the
--     day's sends.
--   * edm.run_sweeps trims edm.shaping_actions (step shaping_actions_trimmed)
--     after retention.shaping_action_days.
-- See docs/explanation/traffic-shaping.md and docs/performance.md.

-- ---------------------------------------------------------------------------
-- The recipient's domain, stored
-- ---------------------------------------------------------------------------

ALTER TABLE edm.subtasks
  ADD COLUMN domain text NOT NULL GENERATED ALWAYS AS (coalesce(edm.email_domain(email), '')) STORED;
COMMENT ON COLUMN edm.subtasks.domain IS 'The domain of email (edm.email_domain; '''' without an @), kept by the database. The claim finds a recipient''s site from it (edm.site_domains, read at the claim, so a mapping added later applies to queued recipients) and skips a blocked site''s recipients by it (subtasks_domain_idx).';
CREATE INDEX subtasks_domain_idx ON edm.subtasks (task_id, domain, not_before, subtask_id)
  WHERE status = 'pending';
COMMENT ON INDEX edm.subtasks_domain_idx IS 'A task''s pending recipients by domain, in claim order within each: the claim skips the recipients of a suspended or full site by jumping from domain to domain (edm.claim_next_subtask) instead of walking them.';

-- ---------------------------------------------------------------------------
-- Retention of the reply-rule log
-- ---------------------------------------------------------------------------

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('retention.shaping_action_days', '30', '30', 'retention', 'integer', 1, 3650, 'days',
   'Rows of edm.shaping_actions (the reply rules applied) are deleted this long after they were recorded, once their action has ended (edm.trim_shaping_actions, a step of every sweep).');

DO $$
BEGIN
  EXECUTE format('COMMENT ON TABLE edm.shaping_actions IS %L',
                 replace(obj_description('edm.shaping_actions'::regclass, 'pg_class'),
                         'after monitoring.metrics_retention_days',
                         'by the sweeps after retention.shaping_action_days'));
END;
$$;

CREATE OR REPLACE FUNCTION edm.trim_shaping_actions(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM edm.shaping_actions a
  WHERE a.at < coalesce(p_now, now())
               - make_interval(days => edm.config_int('retention.shaping_action_days'))
    AND (a.until IS NULL OR a.until < coalesce(p_now, now()));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.trim_shaping_actions(timestamptz) IS
  'Deletes reply-rule log rows (edm.shaping_actions) older than retention.shaping_action_days at p_now whose action has ended; returns how many. A step of edm.run_sweeps (shaping_actions_trimmed).';

SELECT edm.patch_function('edm.run_sweeps(timestamptz)'::regprocedure, ARRAY[
    ['''retention_removed''] LOOP',
     '''retention_removed'', ''shaping_actions_trimmed''] LOOP'],
    ['WHEN ''retention_removed'' THEN edm.apply_retention(p_now)',
     E'WHEN ''retention_removed'' THEN edm.apply_retention(p_now)\n        WHEN ''shaping_actions_trimmed'' THEN edm.trim_shaping_actions(p_now)']],
  '0022');
DO $$
BEGIN
  EXECUTE format('COMMENT ON FUNCTION edm.run_sweeps(timestamptz) IS %L',
                 obj_description('edm.run_sweeps(timestamptz)'::regprocedure, 'pg_proc')
                 || ' Step shaping_actions_trimmed deletes ended reply-rule log rows past retention.shaping_action_days (edm.trim_shaping_actions).');
END;
$$;

-- ---------------------------------------------------------------------------
-- A limit whose maximum alone changes keeps its state
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.set_service_limits(p_service_id bigint, p_limits jsonb)
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
  IF (SELECT count(DISTINCT e->>'name') FROM jsonb_array_elements(p_limits) e)
     <> jsonb_array_length(p_limits) THEN
    RAISE EXCEPTION 'limit names must be unique per service' USING ERRCODE = 'ED005';
  END IF;
  BEGIN
    -- Keep the state of limits whose shape did not change (no fresh burst on
    -- an edit, no restarted count): one whose max_count alone changes is
    -- changed in place (0022). A running warm-up's limit is left alone.
    UPDATE edm.service_limits l SET max_count = (e->>'max_count')::integer
    FROM jsonb_array_elements(p_limits) e
    WHERE l.service_id = p_service_id
      AND e->>'name' = l.name AND e->>'kind' = l.kind
      AND (e->>'max_count')::integer <> l.max_count
      AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
      AND coalesce((e->>'burst')::integer, 1) = l.burst
      AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone
      AND NOT (l.name = 'warmup'
               AND EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = p_service_id));
    DELETE FROM edm.service_limits l
    WHERE l.service_id = p_service_id
      AND NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_limits) e
        WHERE e->>'name' = l.name AND e->>'kind' = l.kind
          AND (e->>'max_count')::integer = l.max_count
          AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
          AND coalesce((e->>'burst')::integer, 1) = l.burst
          AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone);
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
  UPDATE edm.services s SET updated_at = now(), quota_exhausted_until = NULL
  WHERE s.service_id = p_service_id;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  SELECT count(*) INTO v_n FROM edm.service_limits l WHERE l.service_id = p_service_id;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.set_service_limits(bigint, jsonb) IS
  'Replaces the extra limits of a service with p_limits, a JSON array of {name, kind: rate|rolling|calendar_day, max_count, window_ms, burst, time_zone}. A limit whose definition is unchanged keeps its state (no fresh burst); one whose max_count alone changes keeps its state too (the sends it counted still count). Raises ED005 for a bad limit (nothing is changed) and ED001 for an unknown service.';

-- The shaping setters: the same rule.
CREATE OR REPLACE FUNCTION edm.shaping_replace(p_scope text, p_site text, p_service_id bigint,
                                    p_user_id text, p_task_id bigint, p_limits jsonb)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_key text := edm.shaping_key(p_scope, p_site, p_service_id, p_user_id, p_task_id);
  v_n integer;
BEGIN
  IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'array' OR jsonb_array_length(p_limits) > 20 THEN
    RAISE EXCEPTION 'limits must be a JSON array of at most 20 limits' USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_limits) e
             WHERE jsonb_typeof(e) <> 'object'
                OR NOT (e ?& ARRAY['name', 'kind', 'max_count'])
                OR EXISTS (SELECT 1 FROM jsonb_object_keys(e) k
                           WHERE k NOT IN ('name', 'kind', 'max_count', 'window_ms', 'burst', 'time_zone'))) THEN
    RAISE EXCEPTION 'each limit is an object with name, kind, max_count and optionally window_ms, burst, time_zone'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT e->>'name') FROM jsonb_array_elements(p_limits) e)
     <> jsonb_array_length(p_limits) THEN
    RAISE EXCEPTION 'limit names must be unique per scope' USING ERRCODE = 'ED005';
  END IF;
  BEGIN
    -- A limit whose max_count alone changes keeps its state (0022): the
    -- sends it counted still count.
    UPDATE edm.shaping_limits l SET max_count = (e->>'max_count')::integer
    FROM jsonb_array_elements(p_limits) e
    WHERE l.scope_key = v_key
      AND e->>'name' = l.name AND e->>'kind' = l.kind
      AND (e->>'max_count')::integer <> l.max_count
      AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
      AND coalesce((e->>'burst')::integer, 1) = l.burst
      AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone;
    DELETE FROM edm.shaping_limits l
    WHERE l.scope_key = v_key
      AND NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_limits) e
        WHERE e->>'name' = l.name AND e->>'kind' = l.kind
          AND (e->>'max_count')::integer = l.max_count
          AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
          AND coalesce((e->>'burst')::integer, 1) = l.burst
          AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone);
    INSERT INTO edm.shaping_limits (scope, site, service_id, user_id, task_id, name, kind,
                                    max_count, window_ms, burst, time_zone)
    SELECT p_scope, p_site, p_service_id, p_user_id, p_task_id, e->>'name', e->>'kind',
           (e->>'max_count')::integer, (e->>'window_ms')::bigint,
           coalesce((e->>'burst')::integer, 1), e->>'time_zone'
    FROM jsonb_array_elements(p_limits) e
    ON CONFLICT (scope_key, name) DO NOTHING;
  EXCEPTION
    WHEN check_violation OR not_null_violation OR invalid_text_representation
         OR numeric_value_out_of_range OR cardinality_violation THEN
      RAISE EXCEPTION 'invalid limit: %', SQLERRM USING ERRCODE = 'ED005';
  END;
  PERFORM pg_notify('edm_wakeup', 'shaping:' || p_scope);
  SELECT count(*) INTO v_n FROM edm.shaping_limits l WHERE l.scope_key = v_key;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.shaping_replace(text, text, bigint, text, bigint, jsonb) IS
  'Replaces the shaping limits of one scope with p_limits, a JSON array of {name, kind, max_count, window_ms, burst, time_zone} as edm.set_service_limits takes; an unchanged limit keeps its state, and so does one whose max_count alone changes. Raises ED005 for a bad limit (nothing is changed). Called by the edm.set_*_limits functions, which check the scope''s target.';

-- ---------------------------------------------------------------------------
-- A rolling limit's send, counted without a query
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.limit_after(l edm.service_limits, p_slot timestamptz, p_tz text,
                                           p_margin interval DEFAULT '0')
RETURNS edm.service_limits
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  r edm.service_limits := l;
  v_tz text := coalesce(l.time_zone, p_tz);
  v_bms bigint;
  v_b bigint;
  v_min bigint;
  v_prev bigint;
  v_done boolean := false;
  i integer;
BEGIN
  IF l.kind = 'rate' THEN
    -- A bucket that was idle starts from the send's arrival: its slot, or up to
    -- p_margin later (the lateness of a send no lane paces against this limit).
    -- The margin is capped at the limit's burst tolerance: it then costs
    -- nothing while the limit binds, and a limit without a burst gets none.
    r.tat := greatest(coalesce(l.tat, p_slot), p_slot
                      + least(p_margin, ((l.burst - 1) * l.window_ms::double precision
                                         / greatest(l.max_count, 1)) * interval '1 millisecond'))
             + (l.window_ms::double precision / greatest(l.max_count, 1)) * interval '1 millisecond';
  ELSIF l.kind = 'calendar_day' THEN
    r.day_count := CASE WHEN l.day = (p_slot AT TIME ZONE v_tz)::date THEN l.day_count + 1 ELSE 1 END;
    r.day := (p_slot AT TIME ZONE v_tz)::date;
  ELSE
    -- rolling: the rule of edm.rolling_buckets_add (the slot's bucket gains
    -- one, buckets older than any window that can still count go), on the
    -- arrays here. That function is a query, planned again on every call:
    -- 0.35 ms a send, a third of a shaped claim (0022).
    v_bms := edm.limit_bucket_ms(l.window_ms);
    v_b := edm.epoch_ms(p_slot) / v_bms;
    v_min := v_b - ceil(l.window_ms::numeric / v_bms)::bigint - 1;
    r.bucket_idx := '{}';
    r.bucket_n := '{}';
    FOR i IN 1 .. coalesce(cardinality(l.bucket_idx), 0) LOOP
      IF l.bucket_idx[i] <= v_prev THEN
        -- not in ascending order (never written so): the general rule
        SELECT b.bucket_idx, b.bucket_n INTO r.bucket_idx, r.bucket_n
        FROM edm.rolling_buckets_add(l.bucket_idx, l.bucket_n, l.window_ms, p_slot) b;
        RETURN r;
      END IF;
      v_prev := l.bucket_idx[i];
      CONTINUE WHEN l.bucket_idx[i] < v_min;
      IF NOT v_done AND l.bucket_idx[i] >= v_b THEN
        v_done := true;
        IF l.bucket_idx[i] = v_b THEN
          r.bucket_idx := r.bucket_idx || v_b;
          r.bucket_n := r.bucket_n || (l.bucket_n[i] + 1);
          CONTINUE;
        END IF;
        r.bucket_idx := r.bucket_idx || v_b;
        r.bucket_n := r.bucket_n || 1;
      END IF;
      r.bucket_idx := r.bucket_idx || l.bucket_idx[i];
      r.bucket_n := r.bucket_n || l.bucket_n[i];
    END LOOP;
    IF NOT v_done THEN
      r.bucket_idx := r.bucket_idx || v_b;
      r.bucket_n := r.bucket_n || 1;
    END IF;
  END IF;
  RETURN r;
END;
$$;
COMMENT ON FUNCTION edm.limit_after(edm.service_limits, timestamptz, text, interval) IS
  'Limit l after one more send slotted at p_slot (the transition edm.limits_take applies to a service''s limits): rate advances its GCRA arrival time (a bucket that was idle starts from p_slot + p_margin, the send''s latest expected arrival, the margin capped at the burst tolerance (burst - 1) * window / max_count: see queue.shaping_arrival_margin_ms), calendar_day counts the local day (in l.time_zone, else p_tz), rolling adds to the slot''s bucket (the rule of edm.rolling_buckets_add, computed without a query).';

-- ---------------------------------------------------------------------------
-- A task's next recipient outside some domains, without walking them
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.claim_next_subtask(p_task_id bigint, p_now timestamptz, p_exclude bigint[],
                                       p_skip_domains text[],
                                       OUT subtask_id bigint, OUT domain text)
LANGUAGE plpgsql
STRICT
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
  v_pass integer;
  v_lo   timestamptz;
  v_hi   timestamptz;
  v_nb   timestamptz;
  v_id   bigint;
  v_short boolean;
BEGIN
  -- Pass 1: due retries (a finite not_before up to p_now); pass 2: fresh or
  -- returned recipients (not_before -infinity). Each: the lowest in claim
  -- order whose domain is not in p_skip_domains, locked (SKIP LOCKED).
  FOR v_pass IN 1 .. 2 LOOP
    IF v_pass = 1 THEN
      v_lo := '4714-11-24 00:00:00+00 BC';  -- the first finite timestamptz
      v_hi := p_now;
    ELSE
      v_lo := '-infinity';
      v_hi := '-infinity';
    END IF;
    -- The probe: the key of the 64th recipient in claim order.
    SELECT st.not_before, st.subtask_id INTO v_nb, v_id
    FROM edm.subtasks st
    WHERE st.task_id = p_task_id AND st.status = 'pending'
      AND st.not_before >= v_lo AND st.not_before <= v_hi
      AND st.subtask_id <> ALL (p_exclude)
    ORDER BY st.not_before, st.subtask_id
    OFFSET 63 LIMIT 1;
    v_short := v_nb IS NULL;
    IF v_short THEN
      -- fewer than 64: a short walk, to the end of the range
      v_nb := v_hi;
      v_id := 9223372036854775807;
    END IF;
    -- (each bound written once: a range's end given twice, by not_before <= and by
    -- the row comparison, can leave the index scan without its end key)
    SELECT st.subtask_id, st.domain INTO subtask_id, domain
    FROM edm.subtasks st
    WHERE st.task_id = p_task_id AND st.status = 'pending'
      AND st.not_before >= v_lo
      AND (st.not_before, st.subtask_id) <= (v_nb, v_id)
      AND st.subtask_id <> ALL (p_exclude)
      AND st.domain <> ALL (p_skip_domains)
    ORDER BY st.not_before, st.subtask_id
    LIMIT 1
    FOR UPDATE OF st SKIP LOCKED;
    IF subtask_id IS NOT NULL THEN
      RETURN;
    END IF;
    IF NOT v_short THEN
      -- The first 64 are all skipped: the first recipient after them of
      -- each domain not skipped (one index probe per domain of the task),
      -- and the lowest of those.
      SELECT f.not_before, f.subtask_id INTO v_nb, v_id
      FROM (
        WITH RECURSIVE d(domain) AS (
          SELECT (SELECT min(s.domain) FROM edm.subtasks s
                  WHERE s.task_id = p_task_id AND s.status = 'pending')
          UNION ALL
          SELECT (SELECT min(s.domain) FROM edm.subtasks s
                  WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain > d.domain)
          FROM d WHERE d.domain IS NOT NULL)
        SELECT d.domain FROM d WHERE d.domain IS NOT NULL) dd
      CROSS JOIN LATERAL (
        SELECT s.not_before, s.subtask_id FROM edm.subtasks s
        WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain = dd.domain
          AND (s.not_before, s.subtask_id) > (v_nb, v_id) AND s.not_before <= v_hi
          AND s.subtask_id <> ALL (p_exclude)
        ORDER BY s.not_before, s.subtask_id
        LIMIT 1) f
      WHERE dd.domain <> ALL (p_skip_domains)
      ORDER BY f.not_before, f.subtask_id
      LIMIT 1;
      IF FOUND THEN
        SELECT st.subtask_id, st.domain INTO subtask_id, domain
        FROM edm.subtasks st
        WHERE st.task_id = p_task_id AND st.status = 'pending'
          AND (st.not_before, st.subtask_id) >= (v_nb, v_id) AND st.not_before <= v_hi
          AND st.subtask_id <> ALL (p_exclude)
          AND st.domain <> ALL (p_skip_domains)
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        IF subtask_id IS NOT NULL THEN
          RETURN;
        END IF;
      END IF;
    END IF;
  END LOOP;
END;
$$;
COMMENT ON FUNCTION edm.claim_next_subtask(bigint, timestamptz, bigint[], text[]) IS
  'For the claim: task p_task_id''s next recipient (its due retry, else its lowest fresh or returned one, not in p_exclude, claim order) whose domain is not in p_skip_domains (the domains of the sites the slot may not go to), locked FOR UPDATE SKIP LOCKED; NULLs when none (and when an argument is NULL: strict). Looks at the first 64 recipients in claim order, and past them jumps from domain to domain on subtasks_domain_idx, so a blocked site''s recipients cost one index probe per domain of the task, not one row each.';

-- ---------------------------------------------------------------------------
-- The limits of a claim's scopes, one index probe per scope
-- ---------------------------------------------------------------------------

-- edm.shaping_limits is small (a few hundred rows), so the planner scanned it
-- whole for scope_key = ANY (p_keys), comparing every row with every key:
-- 0.4 ms for the 30 scopes of a fill. Joined with the keys it probes the
-- primary key once per scope.
CREATE OR REPLACE FUNCTION edm.shaping_load(p_keys text[], OUT keys text[], OUT lims edm.service_limits[],
                                            OUT held text[])
LANGUAGE plpgsql
-- a probe per scope even where a scan of the small table looks as cheap
SET enable_seqscan = off
AS $$
BEGIN
  SELECT array_agg(x.k), array_agg(x.lim) INTO keys, lims
  FROM (SELECT l.scope_key AS k, edm.shaping_as_limit(l) AS lim
        FROM (SELECT DISTINCT k0 FROM unnest(p_keys) k0) pk
        JOIN edm.shaping_limits l ON l.scope_key = pk.k0
        FOR UPDATE OF l SKIP LOCKED) x;
  held := ARRAY(SELECT a.scope_key
                FROM (SELECT DISTINCT k0 FROM unnest(p_keys) k0) pk
                JOIN edm.shaping_limits a ON a.scope_key = pk.k0
                GROUP BY a.scope_key
                HAVING count(*) > coalesce(cardinality(array_positions(keys, a.scope_key)), 0));
END;
$$;
COMMENT ON FUNCTION edm.shaping_load(text[]) IS
  'For the claim: locks the shaping limits of the scopes p_keys without waiting (FOR UPDATE SKIP LOCKED) and returns them as edm.service_limits rows (keys: the scope_key of each) and the scopes with a limit locked by another transaction (held: no headroom for this claim). One primary-key probe per scope.';

-- The earliest free instant of some scopes, from the limits a claim holds in
-- memory: the positions of those scopes' limits (array_positions) instead of
-- a loop over every limit the call has read (tens, at every slot).
CREATE OR REPLACE FUNCTION edm.shaping_free(p_keys text[], p_all_keys text[], p_lims edm.service_limits[],
                                            p_held text[], p_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_at  timestamptz := p_at;
  v_key text;
  i     integer;
BEGIN
  IF p_keys && p_held THEN
    RETURN 'infinity';
  END IF;
  FOREACH v_key IN ARRAY coalesce(p_keys, '{}') LOOP
    FOREACH i IN ARRAY coalesce(array_positions(p_all_keys, v_key), '{}') LOOP
      v_at := greatest(v_at, edm.limit_next(p_lims[i], p_at, 'UTC'));
    END LOOP;
  END LOOP;
  RETURN v_at;
END;
$$;
COMMENT ON FUNCTION edm.shaping_free(text[], text[], edm.service_limits[], text[], timestamptz) IS
  'For the claim: the earliest instant at or after p_at at which every limit of the scopes p_keys admits one more send, from limits read by edm.shaping_load (p_all_keys[i] is the scope of p_lims[i]); infinity when one of the scopes is in p_held (locked by another transaction).';

-- ---------------------------------------------------------------------------
-- The claim
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.claim_v2(
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
-- Generic plans for every statement, from the first call (see 0014), checked
-- by tests/sql/test_plan_regression.py.
SET plan_cache_mode = force_generic_plan
-- No JIT: the statements are sub-millisecond lookups.
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
  -- a batched fill (0014): how many slots to take at once, and what it found
  v_want  integer;
  b_user  text[];
  b_task  bigint[];
  b_sub   bigint[];
  i       integer;
  -- shaping (0016): which layers are in use at all (one probe each, per call)
  v_global   boolean;
  v_site_lim boolean;
  v_user_lim boolean;
  v_task_lim boolean;
  v_tx       boolean;
  v_susp_any boolean;
  v_tx_max   integer;  -- transactional slots in a row a service may give while bulk waits
  v_margin   interval := make_interval(secs => coalesce(
               edm.config_int('queue.shaping_arrival_margin_ms'), 25) / 1000.0);
  -- ...for the current service
  v_susp     text[];   -- its suspended sites
  v_lsites   text[];   -- sites with limits that apply to it
  v_shaped   boolean;  -- anything beyond 0014's rules to check
  v_tx_run   integer;
  -- ...for the current slot
  v_skip_call text[] := '{}';  -- users skipped for the whole call (v_skip adds this slot's)
  v_blocked  text[];   -- sites this slot may not go to
  v_ok_sites text[];   -- sites found with headroom at this slot
  v_site     text;
  v_free     timestamptz;
  v_keys     text[];
  v_fixed    bigint;   -- the transactional task chosen for this slot
  v_tx_tried bigint[];
  v_tx_slot  boolean;  -- this slot may still go to transactional work ahead of the rotation
  v_stop     boolean := false;
  -- (a recipient's site is its stored domain's row in edm.site_domains, read
  -- at the claim: a mapping added later applies to queued recipients too)
  -- The shaping limits this call uses, read once (locked, or guarded by
  -- the user / task row lock), counted here and written back once at the
  -- end: nobody else may change them meanwhile.
  m_keys     text[] := '{}';   -- scope_key of each limit read
  m_lims     edm.service_limits[] := '{}';
  m_dirty    boolean[] := '{}';
  m_seen     text[] := '{}';   -- scopes read (with or without limits)
  m_held     text[] := '{}';   -- scopes with a limit locked by another transaction
  v_nk       text[];
  v_nl       edm.service_limits[];
  v_nh       text[];
  -- 0022: recipients are left out by their stored domain (subtasks.domain):
  v_sdom     text[];   -- the domains of the service's suspended sites
  v_bdom     text[];   -- the domains of the sites in v_blocked
  v_dom      text;     -- the domain of the recipient found
  b_site     text[];   -- the sites of the fill's recipients (when site limits apply)
  -- the domains of the sites that have limits, and their sites (read once per
  -- call): a recipient's site, as far as limits go, without a query
  v_ldoms      text[] := '{}';
  v_ldom_sites text[] := '{}';
  v_tx_here  boolean;  -- transactional work may take this service's slots
  v_fill     boolean;  -- the batched fill may take the next slots
  v_fill_used boolean;
  j          integer;
  v_idx      integer[];  -- positions in m_keys of a slot's limits
  v_all_lsites text[];   -- sites with site-scope limits (read once per call)
  v_key      text;
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
  -- A service whose next slot comes within the lookahead may be claimed now.
  v_horizon := v_now + coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                       * interval '1 millisecond';
  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';
  PERFORM edm.start_due_tasks(v_now);
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.claimable_tasks > 0) THEN
    RETURN;
  END IF;

  -- Which shaping layers are in use (0016): each an index probe, empty when
  -- unused; with none, everything below runs as in 0014.
  SELECT EXISTS (SELECT 1 FROM edm.shaping_limits l WHERE l.scope = 'global'),
         EXISTS (SELECT 1 FROM edm.shaping_limits l WHERE l.scope IN ('site', 'service_site')),
         EXISTS (SELECT 1 FROM edm.users u WHERE u.has_limits),
         EXISTS (SELECT 1 FROM edm.tasks t WHERE t.has_limits AND t.claimable),
         EXISTS (SELECT 1 FROM edm.tasks t WHERE t.transactional AND t.claimable),
         EXISTS (SELECT 1 FROM edm.site_suspensions x WHERE x.until > v_now)
  INTO v_global, v_site_lim, v_user_lim, v_task_lim, v_tx, v_susp_any;
  IF v_site_lim THEN
    SELECT coalesce(array_agg(sd.domain), '{}'), coalesce(array_agg(sd.site), '{}')
    INTO v_ldoms, v_ldom_sites
    FROM edm.site_domains sd
    WHERE sd.site IN (SELECT l.site FROM edm.shaping_limits l
                      WHERE l.scope IN ('site', 'service_site'));
  END IF;
  IF v_tx THEN
    -- share s: at most s / (1 - s) transactional slots in a row, then one in the rotation
    v_tx_max := (SELECT CASE WHEN x.s >= 1 THEN 2147483647 ELSE floor(x.s / (1 - x.s))::integer END
                 FROM (SELECT coalesce(edm.config_num('queue.transactional_share'), 0.8)::numeric AS s) x);
  END IF;

  -- The head of the rotation, read once per call: the next users in line
  -- (least recently served first) with claimable work, locked for this call.
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
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits, s.tx_run,
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
    v_slot := greatest(v_now, v_svc.next_available_at);
    IF (v_svc.interval_ms > 0 OR v_svc.has_limits) AND v_slot < v_lead_at THEN
      v_slot := v_lead_at;
    END IF;
    v_k := 0;
    -- Shaping of this service: its suspended sites and the sites whose limits apply to it.
    v_susp := '{}';
    v_lsites := '{}';
    -- (statements written out here, not calls of SQL functions holding
    -- queries: those are planned again on every call)
    IF v_susp_any THEN
      v_susp := ARRAY(SELECT x.site FROM edm.site_suspensions x
                      WHERE x.service_id = v_svc.service_id AND x.until > v_now);
    END IF;
    IF v_site_lim THEN
      -- the sites limited across all services (read once per call), and this service's
      IF v_all_lsites IS NULL THEN
        v_all_lsites := ARRAY(SELECT DISTINCT l.site FROM edm.shaping_limits l
                              WHERE l.scope = 'site');
      END IF;
      v_lsites := v_all_lsites || ARRAY(
        SELECT DISTINCT l.site FROM edm.shaping_limits l
        WHERE l.scope = 'service_site' AND l.service_id = v_svc.service_id
          AND l.site <> ALL (v_all_lsites));
    END IF;
    v_shaped := v_global OR v_user_lim OR v_task_lim OR v_tx
                OR cardinality(v_susp) > 0 OR cardinality(v_lsites) > 0;
    -- a site is a set of domains: a recipient is left out by its stored domain
    v_sdom := '{}';
    IF cardinality(v_susp) > 0 THEN
      v_sdom := ARRAY(SELECT sd.domain FROM edm.site_domains sd WHERE sd.site = ANY (v_susp));
    END IF;
    v_tx_run := v_svc.tx_run;
    v_skip := v_skip_call;
    v_pool := NULL;
    IF NOT EXISTS (SELECT 1 FROM edm.grants g WHERE g.service_id = v_svc.service_id
                   OFFSET v_small) THEN
      v_pool := ARRAY(SELECT g.user_id FROM edm.grants g WHERE g.service_id = v_svc.service_id);
      v_pool := ARRAY(SELECT u.user_id FROM edm.users u
                      WHERE u.user_id = ANY (v_pool) AND u.claimable_tasks > 0
                      ORDER BY u.last_served_seq, u.user_id);
    END IF;
    -- Batched fill (0014), for a service without extra limits whose slots all
    -- go to the rotation (no transactional work may use it). Its suspended
    -- sites (fixed for the call) are left out as below; every shaping layer
    -- is checked at each slot after the fill's statement (0022).
    v_blocked := v_susp;
    v_bdom := v_sdom;
    v_tx_here := false;
    IF v_tx THEN
      v_tx_here := EXISTS (
        SELECT 1 FROM edm.tasks t
        WHERE t.transactional AND t.claimable AND t.user_id <> ALL (v_skip)
          AND (
            SELECT true FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = t.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = t.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id))
            LIMIT 1));
    END IF;
    -- (the fill runs at the service's first slot, or at the first slot after
    -- the transactional lane found no work for the service)
    v_fill := NOT v_svc.has_limits AND NOT v_tx_here;
    v_fill_used := false;
    -- One iteration per slot: each to the next user in the fair order
    -- (r_users rotates), or ahead of it to transactional work (0016).
    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    IF v_fill THEN
      v_fill := false;
      v_fill_used := true;
      v_skip := v_skip_call;
      v_blocked := v_susp;
      v_bdom := v_sdom;
      v_want := least(p_per_service - v_k, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today - v_k,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      IF v_want > 0 THEN
        SELECT array_agg(b.user_id ORDER BY b.n), array_agg(b.task_id ORDER BY b.n),
               array_agg(b.sub_id ORDER BY b.n), array_agg(b.domain ORDER BY b.n)
        INTO b_user, b_task, b_sub, b_site
        FROM (
          SELECT bc.n, bc.user_id, bt.task_id, coalesce(br.sub_id, bf.sub_id, bx.sub_id) AS sub_id,
                 coalesce(br.domain, bf.domain, bx.domain) AS domain
          FROM (
            SELECT c.user_id, c.n
            FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)
            WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
              -- CASE keeps the loop's order: a user is locked only once it fits
              AND CASE WHEN (
                SELECT true FROM edm.grants g
                WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
                  AND NOT EXISTS (
                    SELECT 1 FROM edm.grants g2
                    WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                      AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                           FROM edm.services s2 WHERE s2.service_id = g2.service_id))
                LIMIT 1)
              -- a pool's users are not locked yet: one locked by another
              -- claim is being served, leave it out
              THEN v_pool IS NULL
                   OR coalesce((SELECT true FROM edm.users pu
                                WHERE pu.user_id = c.user_id AND pu.claimable_tasks > 0
                                FOR UPDATE OF pu SKIP LOCKED), false)
              ELSE false END
            ORDER BY c.n
            LIMIT v_want) bc
          LEFT JOIN LATERAL (
            SELECT bt0.task_id FROM edm.tasks bt0
            WHERE bt0.user_id = bc.user_id AND bt0.claimable
            ORDER BY bt0.priority DESC, bt0.last_served_seq, bt0.task_id
            LIMIT 1
            FOR UPDATE OF bt0 SKIP LOCKED) bt ON true
          LEFT JOIN LATERAL (
            SELECT bs0.subtask_id AS sub_id, bs0.domain FROM edm.subtasks bs0
            WHERE cardinality(v_bdom) = 0
              AND bs0.task_id = bt.task_id AND bs0.status = 'pending'
              AND bs0.not_before > '-infinity' AND bs0.not_before <= v_now
              AND bs0.subtask_id <> ALL (c_sub)
            ORDER BY bs0.not_before, bs0.subtask_id
            LIMIT 1
            FOR UPDATE OF bs0 SKIP LOCKED) br ON true
          -- the fresh lookup runs only for a task without a due retry
          LEFT JOIN LATERAL (
            SELECT bs1.subtask_id AS sub_id, bs1.domain FROM edm.subtasks bs1
            WHERE cardinality(v_bdom) = 0 AND br.sub_id IS NULL
              AND bs1.task_id = bt.task_id AND bs1.status = 'pending'
              AND bs1.not_before = '-infinity'
              AND bs1.subtask_id <> ALL (c_sub)
            ORDER BY bs1.not_before, bs1.subtask_id
            LIMIT 1
            FOR UPDATE OF bs1 SKIP LOCKED) bf ON true
          -- with suspended sites: both lookups, skipping their domains (0022)
          LEFT JOIN LATERAL (
            -- (a NULL task: the strict function is not called at all; a
            -- filter on its result would run it for every row)
            SELECT bn.subtask_id AS sub_id, bn.domain
            FROM edm.claim_next_subtask(CASE WHEN cardinality(v_bdom) > 0 THEN bt.task_id END,
                                        v_now, c_sub, v_bdom) bn
            WHERE bn.subtask_id IS NOT NULL) bx ON true) b;
        -- (the recipients' sites among the limited ones, from the call's map)
        IF cardinality(v_lsites) > 0 THEN
          FOR i IN 1 .. coalesce(cardinality(b_site), 0) LOOP
            b_site[i] := v_ldom_sites[array_position(v_ldoms, b_site[i])];
          END LOOP;
        ELSE
          b_site := '{}';
        END IF;
        -- Every shaping layer, at each slot as the loop below checks it
        -- (0022): the limits of all the fill's scopes are read in one
        -- statement; the first slot a limit holds back ends the fill, and
        -- the loop decides that slot (skipping a user, task or site, or
        -- delaying it for the global limit).
        IF v_shaped AND coalesce(cardinality(b_sub), 0) > 0 THEN
          v_keys := '{}';
          IF v_global THEN
            v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
          END IF;
          -- the users and tasks with limits (their rows are locked by this
          -- call, so their flags cannot change meanwhile)
          IF v_user_lim OR v_task_lim THEN
            v_keys := v_keys
              || ARRAY(SELECT edm.shaping_key('user', NULL, NULL, u.user_id, NULL) FROM edm.users u
                       WHERE v_user_lim AND u.user_id = ANY (b_user) AND u.has_limits)
              || ARRAY(SELECT edm.shaping_key('task', NULL, NULL, NULL, t.task_id) FROM edm.tasks t
                       WHERE v_task_lim AND t.task_id = ANY (b_task) AND t.has_limits);
          END IF;
          FOR i IN 1 .. cardinality(b_sub) LOOP
            EXIT WHEN b_sub[i] IS NULL;
            IF b_site[i] = ANY (v_lsites) THEN
              v_keys := v_keys || ARRAY[edm.shaping_key('site', b_site[i], NULL, NULL, NULL),
                                        edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                        NULL, NULL)];
            END IF;
          END LOOP;
          v_keys := ARRAY(SELECT DISTINCT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen));
          IF cardinality(v_keys) > 0 THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh FROM edm.shaping_load(v_keys) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
        END IF;
        FOR i IN 1 .. coalesce(cardinality(b_user), 0) LOOP
          EXIT WHEN b_sub[i] IS NULL;
          IF v_shaped THEN
            -- the scopes that count this send
            v_keys := '{}';
            IF v_global THEN
              v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
            END IF;
            IF v_user_lim THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;
            IF b_site[i] = ANY (v_lsites) THEN
              v_keys := v_keys || ARRAY[edm.shaping_key('site', b_site[i], NULL, NULL, NULL),
                                        edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                        NULL, NULL)];
            END IF;
            -- (edm.shaping_free and the count, on the positions of the
            -- scopes' limits: array_positions, not a loop over every limit)
            EXIT WHEN v_keys && m_held;
            v_idx := '{}';
            FOREACH v_key IN ARRAY v_keys LOOP
              v_idx := v_idx || array_positions(m_keys, v_key);
            END LOOP;
            v_free := v_slot;
            FOREACH j IN ARRAY v_idx LOOP
              v_free := greatest(v_free, edm.limit_next(m_lims[j], v_slot, 'UTC'));
            END LOOP;
            EXIT WHEN v_free > v_slot;
            FOREACH j IN ARRAY v_idx LOOP
              m_lims[j] := edm.limit_after(m_lims[j], v_slot, 'UTC', v_margin);
              m_dirty[j] := true;
            END LOOP;
            v_tx_run := 0;  -- a slot given in the rotation
          END IF;
          c_svc := c_svc || v_svc.service_id;
          c_sub := c_sub || b_sub[i];
          c_task := c_task || b_task[i];
          c_user := c_user || b_user[i];
          c_slot := c_slot || v_slot;
          r_users := r_users || b_user[i];  -- not served before in this call
          r_tasks := r_tasks || b_task[i];
          v_k := v_k + 1;
          v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
        END LOOP;
      END IF;
      CONTINUE slots;
    END IF;
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
    -- The global limit delays the slot; past the horizon (or held by another
    -- claim) it ends this claim.
    IF v_global THEN
      v_keys := ARRAY[edm.shaping_key('global', NULL, NULL, NULL, NULL)];
      IF NOT v_keys <@ m_seen THEN
        SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
        FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
        m_keys := m_keys || coalesce(v_nk, '{}');
        m_lims := m_lims || coalesce(v_nl, '{}');
        m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
        m_held := m_held || coalesce(v_nh, '{}');
        m_seen := m_seen || v_keys;
      END IF;
      v_free := edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot);
      IF v_free > v_horizon THEN
        v_stop := true;
        EXIT slots;
      END IF;
      v_slot := v_free;
    END IF;
    -- Users found without work at this slot only (site or user limits, which
    -- free later or on another service) are skipped for this slot alone.
    v_skip := v_skip_call;
    v_blocked := v_susp;
    v_bdom := v_sdom;
    v_ok_sites := '{}';
    v_tx_tried := '{}';
    -- (once the lane found nothing for this service, it finds nothing at its
    -- next slots either: the query is not repeated)
    v_tx_slot := v_tx AND v_tx_here AND v_tx_run < v_tx_max;
    LOOP
      v_user := NULL;
      v_fixed := NULL;
      -- Transactional lane (0016): the least recently served transactional
      -- task whose user may use this service, ahead of the rotation, while
      -- the service's run of such slots stays within the share.
      IF v_tx_slot THEN
        SELECT t.task_id, t.user_id INTO v_fixed, v_user
        FROM edm.tasks t
        WHERE t.transactional AND t.claimable
          AND t.task_id <> ALL (v_tx_tried) AND t.user_id <> ALL (v_skip)
          AND (
            SELECT true FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = t.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = t.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id))
            LIMIT 1)
        ORDER BY t.last_served_seq, t.task_id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        v_tx_slot := v_fixed IS NOT NULL;
        IF v_fixed IS NULL AND cardinality(v_tx_tried) = 0 THEN
          -- no transactional work for this service: its next slots may be filled
          v_tx_here := false;
          v_fill := NOT v_fill_used AND NOT v_svc.has_limits;
        END IF;
        IF v_fixed IS NOT NULL THEN
          -- its user's row guards the user's limits and rotation
          PERFORM 1 FROM edm.users u WHERE u.user_id = v_user FOR UPDATE OF u SKIP LOCKED;
          IF NOT FOUND THEN
            v_tx_tried := v_tx_tried || v_fixed;
            CONTINUE;
          END IF;
        END IF;
      END IF;
      IF v_user IS NULL THEN
      -- The first user of the list (the small pool in rotation order, or the
      -- rotation head, already locked) who has a grant here and no ready
      -- higher-tier service, each probed by a scalar subquery.
      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)
      WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
        AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
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
          v_skip_call := v_skip_call || v_user;
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
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
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
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY array_position(r_users, u.user_id)
        LIMIT 1;
      END IF;
      END IF;
      EXIT WHEN v_user IS NULL;

      -- User limits (0016): a user without headroom at the slot is skipped.
      IF v_user_lim THEN
        v_keys := ARRAY[edm.shaping_key('user', NULL, NULL, v_user, NULL)];
        -- (the user's row, locked by this call, tells whether it has limits:
        -- its flag changes only under that lock)
        IF NOT v_keys <@ m_seen
           AND NOT coalesce((SELECT u.has_limits FROM edm.users u WHERE u.user_id = v_user), true) THEN
          m_seen := m_seen || v_keys;
        END IF;
        IF NOT v_keys <@ m_seen THEN
          SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
          FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
          m_keys := m_keys || coalesce(v_nk, '{}');
          m_lims := m_lims || coalesce(v_nl, '{}');
          m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
          m_held := m_held || coalesce(v_nh, '{}');
          m_seen := m_seen || v_keys;
        END IF;
        v_free := edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot);
        IF v_free > v_slot THEN
          IF v_fixed IS NOT NULL THEN
            v_tx_tried := v_tx_tried || v_fixed;
          END IF;
          v_skip := v_skip || v_user;
          CONTINUE;
        END IF;
      END IF;

      v_tried := '{}';
      LOOP
        v_task := NULL;
        IF v_fixed IS NOT NULL THEN
          -- the transactional task, once
          IF NOT v_fixed = ANY (v_tried) THEN
            v_task := v_fixed;
          END IF;
        ELSE
        -- The user's best task not served in this call (priority, then rotation)...
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
        END IF;
        EXIT WHEN v_task IS NULL;
        -- Task limits (0016): a task without headroom at the slot is skipped.
        IF v_task_lim THEN
          v_keys := ARRAY[edm.shaping_key('task', NULL, NULL, NULL, v_task)];
          -- (as for the user: the task's row is locked by this call)
          IF NOT v_keys <@ m_seen
             AND NOT coalesce((SELECT t.has_limits FROM edm.tasks t WHERE t.task_id = v_task), true) THEN
            m_seen := m_seen || v_keys;
          END IF;
          IF NOT v_keys <@ m_seen THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
            FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
          v_free := edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot);
          IF v_free > v_slot THEN
            v_tried := v_tried || v_task;
            CONTINUE;
          END IF;
        END IF;
        -- Due retries first (I9), then the lowest fresh or returned recipient,
        -- leaving out recipients of the sites this slot may not go to (0016:
        -- suspended for the service, or found without headroom): the slot
        -- goes to the next recipient of another site (no head-of-line blocking).
        LOOP
          IF cardinality(v_bdom) = 0 THEN
            SELECT st.subtask_id, st.domain INTO v_sub, v_dom
            FROM edm.subtasks st
            WHERE st.task_id = v_task AND st.status = 'pending'
              AND st.not_before > '-infinity' AND st.not_before <= v_now
              AND st.subtask_id <> ALL (c_sub)
            ORDER BY st.not_before, st.subtask_id
            LIMIT 1
            FOR UPDATE OF st SKIP LOCKED;
            IF v_sub IS NULL THEN
              SELECT st.subtask_id, st.domain INTO v_sub, v_dom
              FROM edm.subtasks st
              WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before = '-infinity'
                AND st.subtask_id <> ALL (c_sub)
              ORDER BY st.not_before, st.subtask_id
              LIMIT 1
              FOR UPDATE OF st SKIP LOCKED;
            END IF;
          ELSE
            -- both lookups, skipping the blocked sites' domains without
            -- walking their recipients (0022)
            SELECT x.subtask_id, x.domain INTO v_sub, v_dom
            FROM edm.claim_next_subtask(v_task, v_now, c_sub, v_bdom) x;
          END IF;
          v_site := NULL;
          IF v_sub IS NOT NULL AND cardinality(v_lsites) > 0 THEN
            v_site := v_ldom_sites[array_position(v_ldoms, v_dom)];
          END IF;
          EXIT WHEN v_sub IS NULL OR cardinality(v_lsites) = 0;
          -- Site and (service, site) limits of the recipient's site at the slot.
          EXIT WHEN v_site IS NULL OR NOT v_site = ANY (v_lsites) OR v_site = ANY (v_ok_sites);
          v_keys := ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL),
                          edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL)];
          IF NOT v_keys <@ m_seen THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
            FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
          v_free := edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot);
          IF v_free > v_slot THEN
            v_blocked := v_blocked || v_site;
            v_bdom := v_bdom || ARRAY(SELECT sd.domain FROM edm.site_domains sd
                                      WHERE sd.site = v_site);
            v_sub := NULL;
          ELSE
            v_ok_sites := v_ok_sites || v_site;
            EXIT;
          END IF;
        END LOOP;
        EXIT WHEN v_sub IS NOT NULL;
        v_tried := v_tried || v_task;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      IF v_fixed IS NOT NULL THEN
        v_tx_tried := v_tx_tried || v_fixed;
      ELSE
        v_skip := v_skip || v_user;
        IF NOT v_shaped THEN
          v_skip_call := v_skip_call || v_user;
        END IF;
      END IF;
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
    -- Every shaping layer counts the send (0016).
    IF v_shaped THEN
      v_keys := '{}';
      IF v_global THEN
        v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
      END IF;
      IF v_site IS NOT NULL AND v_site = ANY (v_ok_sites) THEN
        v_keys := v_keys || ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL),
                                  edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL)];
      END IF;
      IF v_user_lim THEN
        v_keys := v_keys || edm.shaping_key('user', NULL, NULL, v_user, NULL);
      END IF;
      IF v_task_lim THEN
        v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, v_task);
      END IF;
      -- one send's transition (edm.limit_after), in memory
      FOREACH v_key IN ARRAY v_keys LOOP
        FOREACH j IN ARRAY array_positions(m_keys, v_key) LOOP
          m_lims[j] := edm.limit_after(m_lims[j], v_slot, 'UTC', v_margin);
          m_dirty[j] := true;
        END LOOP;
      END LOOP;
      v_tx_run := CASE WHEN v_fixed IS NOT NULL THEN v_tx_run + 1 ELSE 0 END;
      v_site := NULL;
    END IF;
    v_k := v_k + 1;
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
    END LOOP slots;
    IF v_tx AND v_tx_run IS DISTINCT FROM v_svc.tx_run THEN
      UPDATE edm.services s SET tx_run = v_tx_run WHERE s.service_id = v_svc.service_id;
    END IF;
    EXIT WHEN cardinality(c_sub) >= p_batch OR v_stop;
  END LOOP;
  -- The shaping limits' state after this call's sends (0016).
  IF true = ANY (m_dirty) THEN
    UPDATE edm.shaping_limits l
    SET (tat, bucket_idx, bucket_n, day, day_count) =
        ((m_lims[x.i]).tat, (m_lims[x.i]).bucket_idx, (m_lims[x.i]).bucket_n,
         (m_lims[x.i]).day, (m_lims[x.i]).day_count)
    FROM generate_subscripts(m_keys, 1) AS x(i)
    WHERE m_dirty[x.i] AND l.scope_key = m_keys[x.i] AND l.name = (m_lims[x.i]).name;
  END IF;

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
  'Claims up to p_batch subtasks in one transaction and hands each its slot (send_at: the instant its send may start). For each ready service (next slot within p_lookahead_ms, default queue.slot_lookahead_ms; under its daily quota and every extra limit; not held by another dispatcher; not in p_skip_services), lowest quota share first: up to p_per_service slots, one interval apart and within every limit, each to transactional work first (tasks.transactional, within queue.transactional_share of the service''s slots) or else the least recently served user with work and a grant, that user''s least recently served task (priority first), and its due retry or else its lowest pending subtask. Every shaping layer (edm.shaping_limits) holds at once: a recipient whose site is suspended for the service or without headroom is skipped for another, a user or task without headroom is skipped, the global limit delays the slot or ends the claim. Leases each from its slot for p_lease_seconds, counts the slots against the limits and holds the service for the claimer. Never waits on a lock (a shared limit locked by another claim counts as no headroom).';

SELECT edm.harden_functions();
