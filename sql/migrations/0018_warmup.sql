-- 0018_warmup: warm-up ramps (issue 15, point 3).
--
-- A new sending IP or account must start small and grow: day 1 at most 50
-- sends, day 2 at most 100, day 3 200... up to its full quota. A service
-- follows such a ramp from edm.service_warmups. The ramp is enforced by an
-- ordinary calendar_day limit named 'warmup' in edm.service_limits, whose
-- max_count is today's ceiling: the claim, edm.limit_next and
-- edm.limits_take need nothing new, and above the ceiling the service is
-- simply not ready, so its users' work goes to their other granted services
-- (the claim already does that for any service that is not ready).
--
-- edm.apply_warmups moves each ceiling to the ramp's value for the
-- service's current local day (its quota_tz). It runs in every sweep
-- (edm.run_sweeps) and at once from edm.set_service_warmup. The ceiling is
-- changed in place, keeping the limit's state (its day and day_count), so
-- the sends already counted today still count. Why no ceiling is ever
-- exceeded, even around local midnight and before the first sweep of a day:
--
--   * a ramp never decreases (ED005 otherwise). Until the sweep runs on a
--     new day, the ceiling in force is an earlier day's, which is at most
--     today's; the limit counts by the local date of each send's slot, so
--     today's sends are counted from 0 against a ceiling no higher than
--     today's;
--   * a claim that began just before midnight may still take a slot on the
--     old day after the sweep has raised the ceiling for the new one. When
--     the limit's state is still on an earlier day, the raise adds the
--     difference to that day's count (day_count + new - old), so that day
--     keeps exactly the headroom it had under its own ceiling, and a slot on
--     the new day starts a fresh count as always;
--   * after the ramp's last day the limit goes away, but not while its
--     state is on that last day (yesterday): until the first send of the new
--     day has moved its state on (the next sweep then removes it), a late
--     slot of the last day still meets the last ceiling;
--   * before its start day (a ramp set to start later), the ceiling is the
--     ramp's first value.
--
-- edm.set_service_limits replaces a service's extra limits but leaves
-- 'warmup' alone while a warm-up runs (a row trigger keeps it, with its
-- state): the name belongs to the warm-up. End a warm-up with
-- edm.set_service_warmup(service, NULL).

-- ---------------------------------------------------------------------------
-- Ramps
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.warmup_ramp_problem(p_ramp integer[])
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_ramp IS NULL OR cardinality(p_ramp) = 0 THEN 'a ramp needs at least one day'
  WHEN array_ndims(p_ramp) <> 1 THEN 'a ramp is a one-dimensional array of daily ceilings'
  WHEN cardinality(p_ramp) > 366 THEN 'a ramp lasts at most 366 days'
  WHEN array_position(p_ramp, NULL) IS NOT NULL THEN 'a ramp has no NULL days'
  WHEN EXISTS (SELECT 1 FROM unnest(p_ramp) c WHERE c NOT BETWEEN 1 AND 100000000)
    THEN 'each daily ceiling is between 1 and 100000000'
  WHEN EXISTS (SELECT 1 FROM unnest(p_ramp) WITH ORDINALITY a(c, i)
               JOIN unnest(p_ramp) WITH ORDINALITY b(c, i) ON b.i = a.i + 1
               WHERE b.c < a.c)
    THEN 'a ramp never decreases (each day''s ceiling is at least the day before''s)'
END;
COMMENT ON FUNCTION edm.warmup_ramp_problem(integer[]) IS
  'Why p_ramp is not a valid warm-up ramp (NULL when it is): 1 to 366 daily ceilings, each 1..100000000, never decreasing.';

CREATE FUNCTION edm.warmup_ramp(p_start integer, p_full integer, p_factor numeric DEFAULT 2)
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  v_ramp integer[];
  v_c integer;
BEGIN
  IF p_start IS NULL OR p_full IS NULL OR p_factor IS NULL OR p_start < 1
     OR p_full < p_start OR p_full > 100000000 OR p_factor <= 1 OR p_factor > 100 THEN
    RAISE EXCEPTION 'warmup_ramp: need 1 <= start <= full <= 100000000 and 1 < factor <= 100, got %, %, %',
      p_start, p_full, p_factor USING ERRCODE = 'ED005';
  END IF;
  v_c := p_start;
  v_ramp := ARRAY[v_c];
  WHILE v_c < p_full LOOP
    v_c := least(p_full, ceil(v_c * p_factor))::integer;
    v_ramp := v_ramp || v_c;
    IF cardinality(v_ramp) > 366 THEN
      RAISE EXCEPTION 'warmup_ramp: from % to % by a factor of % takes more than 366 days',
        p_start, p_full, p_factor USING ERRCODE = 'ED005';
    END IF;
  END LOOP;
  RETURN v_ramp;
END;
$$;
COMMENT ON FUNCTION edm.warmup_ramp(integer, integer, numeric) IS
  'A growing warm-up ramp: p_start on day 1, then each day the day before''s ceiling times p_factor (rounded up) until p_full, the last day. warmup_ramp(50, 1000) = {50,100,200,400,800,1000}. Raises ED005 for bad bounds or a ramp longer than 366 days.';

CREATE FUNCTION edm.warmup_ceiling(p_ramp integer[], p_started_on date, p_day date)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_day < p_started_on THEN p_ramp[1]
            WHEN p_day - p_started_on + 1 > cardinality(p_ramp) THEN NULL
            ELSE p_ramp[p_day - p_started_on + 1] END;
COMMENT ON FUNCTION edm.warmup_ceiling(integer[], date, date) IS
  'The ceiling of local day p_day on ramp p_ramp started on p_started_on (day 1): the ramp''s first value before the start, NULL after its last day (the warm-up is over).';

CREATE TABLE edm.service_warmups (
  service_id  bigint PRIMARY KEY REFERENCES edm.services ON DELETE CASCADE,
  started_on  date NOT NULL CHECK (isfinite(started_on)),
  ramp        integer[] NOT NULL CHECK (edm.warmup_ramp_problem(ramp) IS NULL AND array_lower(ramp, 1) = 1),
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.service_warmups IS
  'Services warming up: on local day n of the ramp (day 1 = started_on, in the service''s quota_tz) the service sends at most ramp[n]. Enforced by the calendar_day limit ''warmup'' in edm.service_limits, whose max_count edm.apply_warmups keeps at the day''s ceiling; the row and the limit go away after the last day. Set with edm.set_service_warmup; see docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.service_warmups.service_id IS 'Service warming up.';
COMMENT ON COLUMN edm.service_warmups.started_on IS 'Local date (in the service''s quota_tz) of day 1 of the ramp.';
COMMENT ON COLUMN edm.service_warmups.ramp IS 'Daily ceilings, day 1 first; never decreasing, 1 to 366 days.';
COMMENT ON COLUMN edm.service_warmups.created_at IS 'When the warm-up was first set.';
COMMENT ON COLUMN edm.service_warmups.updated_at IS 'When the ramp or its start was last changed.';

-- ---------------------------------------------------------------------------
-- The limit follows the ramp
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.service_limits_keep_warmup()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  -- The service row is gone when this is the cascade of its deletion: let it go.
  IF EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = OLD.service_id)
     AND EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = OLD.service_id) THEN
    RETURN NULL;
  END IF;
  RETURN OLD;
END;
$$;
COMMENT ON FUNCTION edm.service_limits_keep_warmup() IS
  'Row trigger on edm.service_limits: the limit ''warmup'' of a service that is warming up is not deleted (edm.set_service_limits replacing the other limits keeps it, with its state); it goes when the warm-up ends.';
CREATE TRIGGER service_limits_keep_warmup BEFORE DELETE ON edm.service_limits
  FOR EACH ROW WHEN (OLD.name = 'warmup') EXECUTE FUNCTION edm.service_limits_keep_warmup();

CREATE FUNCTION edm.apply_warmups(p_now timestamptz DEFAULT NULL, p_service_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  w         record;
  l         record;
  v_today   date;
  v_ceiling integer;
  v_n       integer := 0;
BEGIN
  -- Lock order as the claim's: the service row, then its limits. Only the
  -- services with something to do are locked (claims skip a locked service
  -- until the sweep commits): on most sweeps, none. Nothing to do: the limit
  -- holds the day's ceiling, or the ramp is over and the limit still counts
  -- its last day (kept, see below).
  FOR w IN
    SELECT x.service_id, x.ramp, x.started_on, s.quota_tz, s.quota_day, s.sent_today
    FROM edm.service_warmups x JOIN edm.services s ON s.service_id = x.service_id
    CROSS JOIN LATERAL (SELECT (v_now AT TIME ZONE s.quota_tz)::date AS today) d
    WHERE (p_service_id IS NULL OR x.service_id = p_service_id)
      AND NOT EXISTS (
        SELECT 1 FROM edm.service_limits sl
        WHERE sl.service_id = x.service_id AND sl.name = 'warmup'
          AND (sl.max_count = edm.warmup_ceiling(x.ramp, x.started_on, d.today)
               OR (edm.warmup_ceiling(x.ramp, x.started_on, d.today) IS NULL
                   AND sl.day = d.today - 1
                   AND edm.warmup_ceiling(x.ramp, x.started_on, sl.day) IS NOT NULL)))
    ORDER BY x.service_id
    FOR NO KEY UPDATE OF s
  LOOP
    v_today := (v_now AT TIME ZONE w.quota_tz)::date;
    v_ceiling := edm.warmup_ceiling(w.ramp, w.started_on, v_today);
    SELECT sl.max_count, sl.day INTO l FROM edm.service_limits sl
    WHERE sl.service_id = w.service_id AND sl.name = 'warmup'
    FOR UPDATE;
    IF v_ceiling IS NULL THEN
      -- The ramp is over. Keep the last ceiling while the limit still counts
      -- the ramp's last day (a late slot of that day may come); it goes at
      -- the first sweep after the state has moved on.
      CONTINUE WHEN l.day IS NOT NULL AND l.day = v_today - 1
                    AND edm.warmup_ceiling(w.ramp, w.started_on, l.day) IS NOT NULL;
      DELETE FROM edm.service_warmups x WHERE x.service_id = w.service_id;
      DELETE FROM edm.service_limits sl WHERE sl.service_id = w.service_id AND sl.name = 'warmup';
      PERFORM pg_notify('edm_wakeup', 'service:' || w.service_id);
      v_n := v_n + 1;
    ELSIF l.max_count IS NULL THEN
      -- New: today's sends so far count (the service's own count of its quota day).
      INSERT INTO edm.service_limits (service_id, name, kind, max_count, day, day_count)
      VALUES (w.service_id, 'warmup', 'calendar_day', v_ceiling, v_today,
              CASE WHEN w.quota_day = v_today THEN w.sent_today ELSE 0 END);
      v_n := v_n + 1;
    ELSIF l.max_count <> v_ceiling THEN
      -- In place, state kept. A count of an earlier day moves by the change,
      -- so that day keeps the headroom it had under its own ceiling.
      UPDATE edm.service_limits sl
      SET max_count = v_ceiling,
          day_count = CASE WHEN sl.day < v_today
                           THEN greatest(0, sl.day_count + v_ceiling - sl.max_count)
                           ELSE sl.day_count END
      WHERE sl.service_id = w.service_id AND sl.name = 'warmup';
      IF v_ceiling > l.max_count THEN
        -- a block computed under the lower ceiling is re-decided by the next claim
        UPDATE edm.services s SET quota_exhausted_until = NULL WHERE s.service_id = w.service_id;
        PERFORM pg_notify('edm_wakeup', 'service:' || w.service_id);
      END IF;
      v_n := v_n + 1;
    END IF;
  END LOOP;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.apply_warmups(timestamptz, bigint) IS
  'Sets the limit ''warmup'' of each warming-up service (or of p_service_id only) to the ceiling of its current local day at p_now, in place (its count kept); after the ramp''s last day removes the limit and the warm-up. Run by every sweep (edm.run_sweeps) and by edm.set_service_warmup. Returns how many services changed.';

CREATE FUNCTION edm.set_service_warmup(p_service_id bigint, p_ramp integer[],
                                       p_started_on date DEFAULT NULL,
                                       p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_tz text;
  v_problem text;
BEGIN
  SELECT s.quota_tz INTO v_tz FROM edm.services s WHERE s.service_id = p_service_id
  FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  IF p_ramp IS NULL OR cardinality(p_ramp) = 0 THEN
    -- End the warm-up now: the limit goes with it.
    DELETE FROM edm.service_warmups w WHERE w.service_id = p_service_id;
    IF FOUND THEN
      DELETE FROM edm.service_limits l WHERE l.service_id = p_service_id AND l.name = 'warmup';
      PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
    END IF;
    RETURN NULL;
  END IF;
  v_problem := edm.warmup_ramp_problem(p_ramp);
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'invalid warm-up ramp: %', v_problem USING ERRCODE = 'ED005';
  END IF;
  IF p_started_on IS NOT NULL AND NOT isfinite(p_started_on) THEN
    RAISE EXCEPTION 'invalid warm-up start: %', p_started_on USING ERRCODE = 'ED005';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = p_service_id)
     AND EXISTS (SELECT 1 FROM edm.service_limits l
                 WHERE l.service_id = p_service_id AND l.name = 'warmup') THEN
    RAISE EXCEPTION 'service % has a limit of its own named warmup: rename it first (edm.set_service_limits)',
      p_service_id USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.service_warmups (service_id, started_on, ramp)
  VALUES (p_service_id,
          coalesce(p_started_on, (coalesce(p_now, now()) AT TIME ZONE v_tz)::date),
          ARRAY(SELECT c FROM unnest(p_ramp) WITH ORDINALITY u(c, i) ORDER BY i))
  ON CONFLICT (service_id) DO UPDATE
    SET started_on = EXCLUDED.started_on, ramp = EXCLUDED.ramp, updated_at = now();
  PERFORM edm.apply_warmups(p_now, p_service_id);
  RETURN (SELECT l.max_count FROM edm.service_limits l
          WHERE l.service_id = p_service_id AND l.name = 'warmup');
END;
$$;
COMMENT ON FUNCTION edm.set_service_warmup(bigint, integer[], date, timestamptz) IS
  'Puts service p_service_id on warm-up ramp p_ramp (daily ceilings, day 1 first, never decreasing; see edm.warmup_ramp) from local date p_started_on (default: today in its quota_tz), replacing a ramp it had, and applies today''s ceiling at once. A NULL or empty ramp ends the warm-up and removes its limit. Returns the ceiling in force (NULL when none). Raises ED001 for an unknown service, ED005 for a bad ramp (nothing is changed).';

-- ---------------------------------------------------------------------------
-- Where a warm-up stands
-- ---------------------------------------------------------------------------

CREATE VIEW edm.service_warmup_status AS
SELECT w.service_id, s.name AS service_name, w.started_on,
       x.today - w.started_on + 1 AS day,
       cardinality(w.ramp) AS days,
       CASE WHEN x.today < w.started_on THEN 'scheduled'
            WHEN x.today - w.started_on + 1 > cardinality(w.ramp) THEN 'ended'
            ELSE 'ramping' END AS state,
       edm.warmup_ceiling(w.ramp, w.started_on, x.today) AS ceiling_today,
       l.max_count AS ceiling_in_force,
       CASE WHEN l.day = x.today THEN l.day_count ELSE 0 END AS used_today,
       edm.warmup_ceiling(w.ramp, w.started_on, x.today + 1) AS ceiling_tomorrow,
       w.ramp[cardinality(w.ramp)] AS final_ceiling,
       edm.service_next_quota_day(s.quota_tz, now()) AS next_day_at,
       w.ramp
FROM edm.service_warmups w
JOIN edm.services s ON s.service_id = w.service_id
CROSS JOIN LATERAL (SELECT (now() AT TIME ZONE s.quota_tz)::date AS today) x
LEFT JOIN edm.service_limits l ON l.service_id = w.service_id AND l.name = 'warmup';
COMMENT ON VIEW edm.service_warmup_status IS
  'Each warming-up service: day n of N of its ramp (local days in its quota_tz), today''s ceiling, the ceiling in force in its limit ''warmup'' (it follows the ramp at each sweep), sends counted today and tomorrow''s ceiling.';
COMMENT ON COLUMN edm.service_warmup_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_warmup_status.service_name IS 'Service name.';
COMMENT ON COLUMN edm.service_warmup_status.started_on IS 'Local date of day 1.';
COMMENT ON COLUMN edm.service_warmup_status.day IS 'Today''s day of the ramp (day n of days; below 1 before the start, above days once over).';
COMMENT ON COLUMN edm.service_warmup_status.days IS 'Length of the ramp in days.';
COMMENT ON COLUMN edm.service_warmup_status.state IS 'scheduled (before day 1), ramping, or ended (past the last day; the warm-up and its limit go at the first sweep once the limit no longer counts the last day).';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_today IS 'The ramp''s ceiling for today (NULL once ended).';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_in_force IS 'max_count of the limit ''warmup'' now: the ceiling the claim applies (an earlier, lower day''s until the first sweep of the day).';
COMMENT ON COLUMN edm.service_warmup_status.used_today IS 'Sends counted by the limit ''warmup'' for today.';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_tomorrow IS 'The ramp''s ceiling for tomorrow (NULL when the ramp ends today).';
COMMENT ON COLUMN edm.service_warmup_status.final_ceiling IS 'The ramp''s last ceiling.';
COMMENT ON COLUMN edm.service_warmup_status.next_day_at IS 'When the next local day (and its ceiling) starts.';
COMMENT ON COLUMN edm.service_warmup_status.ramp IS 'The whole ramp, day 1 first.';

-- ---------------------------------------------------------------------------
-- The sweep: one step more in edm.run_sweeps
-- ---------------------------------------------------------------------------
-- Patched into the current definition rather than restated, so the steps
-- other migrations add to edm.run_sweeps are kept.

DO $$
DECLARE
  v_def text := pg_get_functiondef('edm.run_sweeps(timestamptz)'::regprocedure);
  v_patch text[][] := ARRAY[
    ['ARRAY[''quota_days_rolled'', ',
     'ARRAY[''quota_days_rolled'', ''warmups_applied'', '],
    ['WHEN ''quota_days_rolled'' THEN edm.roll_quota_days(p_now)',
     E'WHEN ''quota_days_rolled'' THEN edm.roll_quota_days(p_now)\n        WHEN ''warmups_applied'' THEN edm.apply_warmups(p_now)']];
  i integer;
BEGIN
  FOR i IN 1 .. array_length(v_patch, 1) LOOP
    IF position(v_patch[i][1] IN v_def) = 0 THEN
      RAISE EXCEPTION '0018: edm.run_sweeps has no %; add the warmups_applied step by hand', v_patch[i][1];
    END IF;
    v_def := replace(v_def, v_patch[i][1], v_patch[i][2]);
  END LOOP;
  EXECUTE v_def;
  EXECUTE format('COMMENT ON FUNCTION edm.run_sweeps(timestamptz) IS %L',
                 obj_description('edm.run_sweeps(timestamptz)'::regprocedure, 'pg_proc')
                 || ' Step warmups_applied moves warm-up ceilings to the day''s (edm.apply_warmups).');
END;
$$;

-- ---------------------------------------------------------------------------
-- Roles: the new names in the group roles' grants (the pattern of 0015)
-- ---------------------------------------------------------------------------

SELECT edm.extend_roles(ARRAY[
    ['v_app_fns text[] := ARRAY[',
     'v_app_fns text[] := ARRAY[''set_service_warmup'', ''warmup_ramp'', ''warmup_ceiling'', ''warmup_ramp_problem'', '],
    ['v_monitor_fns text[] := ARRAY[',
     'v_monitor_fns text[] := ARRAY[''warmup_ramp'', ''warmup_ceiling'', ''warmup_ramp_problem'', '],
    ['edm.config, edm.task_progress, ',
     'edm.config, edm.task_progress, edm.service_warmups, edm.service_warmup_status, ']], '0018');

SELECT edm.harden_functions();
