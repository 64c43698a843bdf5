-- 0016_shaping: layered limits and the transactional lane (issue 15, points
-- 1, 4 and 5).
--
--   * edm.shaping_limits: limits of the same form as edm.service_limits
--     (rate with burst, rolling window, calendar day) for five scopes:
--     global (every send), site (a site across all services), service_site
--     (one service to one site), user (a tenant's plan) and task (a
--     campaign's maximum rate). They are evaluated by the rule of 0008
--     (edm.limit_next on the row cast to edm.service_limits) and advanced by
--     one transition, edm.limit_after. Setters replace one scope's list and
--     keep the state of unchanged limits, as edm.set_service_limits does.
--   * tasks.transactional: a transactional task is claimed ahead of bulk
--     work on the services its user may use, for at most
--     queue.transactional_share of a service's slots while bulk work waits
--     (services.tx_run counts the service's transactional slots in a row).
--   * edm.claim_v2 holds every layer at once. Per service, a recipient whose
--     site is suspended for it or whose site / (service, site) limits have no
--     headroom at the slot is skipped and the slot goes to another recipient
--     (no head-of-line blocking); a user without headroom is skipped, so is a
--     task; the global limit delays the slot or ends the claim. Limit rows
--     shared by services (global, site) are locked with SKIP LOCKED: one
--     locked by another claim counts as no headroom for this call. User and
--     task limit rows are guarded by the user / task row locks the claim
--     already takes. Each limit a call needs is read once (edm.shaping_load),
--     counted in memory slot by slot and written back once at the end. When
--     no shaping is configured the claim reads one row of flags more and
--     otherwise runs as in 0014 (batched fill included); a service shaped by
--     suspensions alone keeps the batched fill too.
--   * The tier check's readiness of a higher-priority service is written
--     once, edm.service_free_for_tier (inlined by the planner), instead of
--     four copies of its expression (issue 18).
--   * edm.task_wait_reason names the binding layer; views
--     edm.shaping_limit_status and edm.site_status.
-- See docs/explanation/traffic-shaping.md.

-- ---------------------------------------------------------------------------
-- Settings and columns
-- ---------------------------------------------------------------------------

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('queue.transactional_share', '0.8', '0.8', 'queue', 'number', 0, 1, 'fraction',
   'The most of a service''s slots transactional tasks may take ahead of bulk work while bulk work waits for that service (0.8: at most 4 transactional slots in a row, then a bulk one). 1 lets transactional work take every slot; 0 claims it in the fair rotation like bulk work.'),
  ('queue.shaping_arrival_margin_ms', '25', '25', 'queue', 'integer', 0, 10000, 'ms',
   'A rate limit of a layer several lanes send against (global, site, service_site, user, task) counts a send that found its bucket idle as arriving this long after its slot: a provider''s bucket starts from the send''s arrival, and sends of different lanes and dispatchers start a few ms apart from their slots. Without it, the first send after a pause arriving late by more than the 5 ms tolerance makes the next on-time one early as the provider counts. Capped at each limit''s burst tolerance, (burst - 1) * window / max_count, so it costs nothing while the limit binds and a limit without a burst gets none.');

ALTER TABLE edm.tasks
  ADD COLUMN transactional boolean NOT NULL DEFAULT false,
  ADD COLUMN has_limits boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN edm.tasks.transactional IS 'Transactional lane: claimed ahead of bulk work on the services its user may use, within queue.transactional_share of a service''s slots while bulk work waits. Set at creation or by edm.set_task_transactional.';
COMMENT ON COLUMN edm.tasks.has_limits IS 'True when edm.shaping_limits has task-scope rows for this task (kept by a trigger); the claim reads them only then.';

ALTER TABLE edm.users
  ADD COLUMN has_limits boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN edm.users.has_limits IS 'True when edm.shaping_limits has user-scope rows for this user (kept by a trigger); the claim reads them only then.';

ALTER TABLE edm.services
  ADD COLUMN tx_run integer NOT NULL DEFAULT 0 CHECK (tx_run >= 0);
COMMENT ON COLUMN edm.services.tx_run IS 'Transactional slots the service gave ahead of bulk work in a row (reset by a slot given in the fair rotation); with queue.transactional_share it decides when bulk work gets the next slot.';

CREATE INDEX tasks_transactional_idx ON edm.tasks (last_served_seq, task_id)
  WHERE transactional AND claimable;
COMMENT ON INDEX edm.tasks_transactional_idx IS 'Claimable transactional tasks, least recently served first: the transactional lane of the claim (empty when the lane is unused).';
CREATE INDEX tasks_limited_idx ON edm.tasks (task_id) WHERE has_limits AND claimable;
COMMENT ON INDEX edm.tasks_limited_idx IS 'Claimable tasks with task limits: one probe tells the claim whether the layer is in use.';
CREATE INDEX users_limited_idx ON edm.users (user_id) WHERE has_limits;
COMMENT ON INDEX edm.users_limited_idx IS 'Users with user limits: one probe tells the claim whether the layer is in use.';

-- ---------------------------------------------------------------------------
-- Shaping limits
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.shaping_key(p_scope text, p_site text, p_service_id bigint,
                                p_user_id text, p_task_id bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_scope || '|' || coalesce(p_service_id::text, '') || '|' || coalesce(p_site, '')
       || '|' || coalesce(p_task_id::text, '') || '|' || coalesce(p_user_id, '');
COMMENT ON FUNCTION edm.shaping_key(text, text, bigint, text, bigint) IS
  'The key of one shaping scope (edm.shaping_limits.scope_key): scope|service|site|task|user, empty where the scope has no such part.';

CREATE TABLE edm.shaping_limits (
  scope        text NOT NULL CHECK (scope IN ('global', 'site', 'service_site', 'user', 'task')),
  site         text REFERENCES edm.sites ON UPDATE CASCADE ON DELETE CASCADE,
  service_id   bigint REFERENCES edm.services ON DELETE CASCADE,
  user_id      text REFERENCES edm.users ON DELETE CASCADE,
  task_id      bigint REFERENCES edm.tasks ON DELETE CASCADE,
  scope_key    text NOT NULL GENERATED ALWAYS AS
                 (edm.shaping_key(scope, site, service_id, user_id, task_id)) STORED,
  name         text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
  kind         text NOT NULL CHECK (kind IN ('rate', 'rolling', 'calendar_day')),
  max_count    integer NOT NULL CHECK (max_count BETWEEN 0 AND 100000000),
  window_ms    bigint CHECK (window_ms BETWEEN 1 AND 31 * 86400000::bigint),
  burst        integer NOT NULL DEFAULT 1 CHECK (burst BETWEEN 1 AND 100000),
  time_zone    text CHECK (time_zone IS NULL OR edm.is_valid_timezone(time_zone)),
  -- state, written by claims only (the columns of edm.service_limits)
  tat          timestamptz,
  bucket_idx   bigint[] NOT NULL DEFAULT '{}',
  bucket_n     integer[] NOT NULL DEFAULT '{}',
  day          date,
  day_count    integer NOT NULL DEFAULT 0 CHECK (day_count >= 0),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (scope_key, name),
  CONSTRAINT shaping_limits_target CHECK (
    CASE scope
      WHEN 'global' THEN site IS NULL AND service_id IS NULL AND user_id IS NULL AND task_id IS NULL
      WHEN 'site' THEN site IS NOT NULL AND service_id IS NULL AND user_id IS NULL AND task_id IS NULL
      WHEN 'service_site' THEN site IS NOT NULL AND service_id IS NOT NULL AND user_id IS NULL
                               AND task_id IS NULL
      WHEN 'user' THEN user_id IS NOT NULL AND site IS NULL AND service_id IS NULL AND task_id IS NULL
      ELSE task_id IS NOT NULL AND site IS NULL AND service_id IS NULL AND user_id IS NULL END),
  CONSTRAINT shaping_limits_shape CHECK (
    CASE kind WHEN 'calendar_day' THEN window_ms IS NULL AND burst = 1
              WHEN 'rolling' THEN window_ms IS NOT NULL AND window_ms >= 1000 AND burst = 1
                                  AND time_zone IS NULL
              ELSE window_ms IS NOT NULL AND time_zone IS NULL AND burst <= greatest(max_count, 1) END),
  CONSTRAINT shaping_limits_buckets CHECK (cardinality(bucket_idx) = cardinality(bucket_n))
);
CREATE INDEX shaping_limits_scope_idx ON edm.shaping_limits (scope, service_id);
COMMENT ON INDEX edm.shaping_limits_scope_idx IS 'Limits by scope (is a layer in use; the site limits that apply to a service).';
CREATE INDEX shaping_limits_user_idx ON edm.shaping_limits (user_id) WHERE user_id IS NOT NULL;
COMMENT ON INDEX edm.shaping_limits_user_idx IS 'The ON DELETE CASCADE from edm.users.';
CREATE INDEX shaping_limits_task_idx ON edm.shaping_limits (task_id) WHERE task_id IS NOT NULL;
COMMENT ON INDEX edm.shaping_limits_task_idx IS 'The ON DELETE CASCADE from edm.tasks.';
CREATE INDEX shaping_limits_site_idx ON edm.shaping_limits (site) WHERE site IS NOT NULL;
COMMENT ON INDEX edm.shaping_limits_site_idx IS 'The ON UPDATE / DELETE CASCADE from edm.sites.';
COMMENT ON TABLE edm.shaping_limits IS
  'Traffic-shaping limits beyond a service''s own (edm.service_limits), in the same form (rate with burst, rolling window, calendar day) and all held at once by the claim: global (every send), site (one destination site across all services), service_site (one service to one site), user (a tenant''s plan) and task (a campaign''s maximum rate). A calendar_day limit without time_zone counts UTC days. Set with edm.set_global_limits, edm.set_site_limits, edm.set_user_limits and edm.set_task_limits; see docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.shaping_limits.scope IS 'global, site, service_site, user or task.';
COMMENT ON COLUMN edm.shaping_limits.site IS 'site and service_site scopes: the destination site.';
COMMENT ON COLUMN edm.shaping_limits.service_id IS 'service_site scope: the sending service.';
COMMENT ON COLUMN edm.shaping_limits.user_id IS 'user scope: the tenant.';
COMMENT ON COLUMN edm.shaping_limits.task_id IS 'task scope: the campaign.';
COMMENT ON COLUMN edm.shaping_limits.scope_key IS 'The scope as one key (edm.shaping_key); with name, the primary key.';
COMMENT ON COLUMN edm.shaping_limits.name IS 'Name of the limit, unique per scope (e.g. per_hour, per_day); waiting reasons name it.';
COMMENT ON COLUMN edm.shaping_limits.kind IS 'rate, rolling or calendar_day (as edm.service_limits.kind).';
COMMENT ON COLUMN edm.shaping_limits.max_count IS 'Most sends per window (0 blocks the scope).';
COMMENT ON COLUMN edm.shaping_limits.window_ms IS 'Window length in milliseconds (rate and rolling); NULL for calendar_day.';
COMMENT ON COLUMN edm.shaping_limits.burst IS 'rate only: most sends at once (token bucket depth).';
COMMENT ON COLUMN edm.shaping_limits.time_zone IS 'calendar_day only: time zone whose midnight starts a day; NULL = UTC.';
COMMENT ON COLUMN edm.shaping_limits.tat IS 'rate state: GCRA theoretical arrival time (as edm.service_limits.tat).';
COMMENT ON COLUMN edm.shaping_limits.bucket_idx IS 'rolling state: buckets with sends, oldest first (as edm.service_limits.bucket_idx).';
COMMENT ON COLUMN edm.shaping_limits.bucket_n IS 'rolling state: sends slotted in each bucket of bucket_idx.';
COMMENT ON COLUMN edm.shaping_limits.day IS 'calendar_day state: the local date day_count counts.';
COMMENT ON COLUMN edm.shaping_limits.day_count IS 'calendar_day state: sends slotted on day.';
COMMENT ON COLUMN edm.shaping_limits.created_at IS 'When the limit was set.';

CREATE FUNCTION edm.shaping_limits_flag()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  UPDATE edm.users u
  SET has_limits = EXISTS (SELECT 1 FROM edm.shaping_limits l
                           WHERE l.scope = 'user' AND l.user_id = u.user_id)
  WHERE u.user_id IN (SELECT x.user_id FROM changed x WHERE x.scope = 'user');
  UPDATE edm.tasks t
  SET has_limits = EXISTS (SELECT 1 FROM edm.shaping_limits l
                           WHERE l.scope = 'task' AND l.task_id = t.task_id)
  WHERE t.task_id IN (SELECT x.task_id FROM changed x WHERE x.scope = 'task');
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.shaping_limits_flag() IS
  'Statement trigger on edm.shaping_limits: keeps users.has_limits and tasks.has_limits in step, so the claim reads user and task limits only where there are some.';
CREATE TRIGGER shaping_limits_flag_ins AFTER INSERT ON edm.shaping_limits
  REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.shaping_limits_flag();
CREATE TRIGGER shaping_limits_flag_del AFTER DELETE ON edm.shaping_limits
  REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.shaping_limits_flag();
COMMENT ON TRIGGER shaping_limits_flag_ins ON edm.shaping_limits IS 'Sets users.has_limits / tasks.has_limits for new user and task limits.';
COMMENT ON TRIGGER shaping_limits_flag_del ON edm.shaping_limits IS 'Clears users.has_limits / tasks.has_limits when their last limit goes.';

-- The rule of 0008, reused: a shaping row read as an edm.service_limits row.
CREATE FUNCTION edm.shaping_as_limit(l edm.shaping_limits)
RETURNS edm.service_limits
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ROW(coalesce(l.service_id, 0), l.name, l.kind, l.max_count, l.window_ms, l.burst,
           l.time_zone,
           l.tat, l.bucket_idx, l.bucket_n, l.day, l.day_count, l.created_at)::edm.service_limits;
COMMENT ON FUNCTION edm.shaping_as_limit(edm.shaping_limits) IS
  'Shaping limit l as an edm.service_limits row, so that edm.limit_next and edm.limit_after evaluate it by the same rule as a service''s limits.';

-- One send's state transition of a limit, written once for the shaping layers.
CREATE FUNCTION edm.limit_after(l edm.service_limits, p_slot timestamptz, p_tz text,
                                p_margin interval DEFAULT '0')
RETURNS edm.service_limits
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  r edm.service_limits := l;
  v_tz text := coalesce(l.time_zone, p_tz);
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
    SELECT b.bucket_idx, b.bucket_n INTO r.bucket_idx, r.bucket_n
    FROM edm.rolling_buckets_add(l.bucket_idx, l.bucket_n, l.window_ms, p_slot) b;
  END IF;
  RETURN r;
END;
$$;
COMMENT ON FUNCTION edm.limit_after(edm.service_limits, timestamptz, text, interval) IS
  'Limit l after one more send slotted at p_slot (the transition edm.limits_take applies to a service''s limits): rate advances its GCRA arrival time (a bucket that was idle starts from p_slot + p_margin, the send''s latest expected arrival, the margin capped at the burst tolerance (burst - 1) * window / max_count: see queue.shaping_arrival_margin_ms), calendar_day counts the local day (in l.time_zone, else p_tz), rolling adds to the slot''s bucket.';

CREATE FUNCTION edm.shaping_next(p_keys text[], p_at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN coalesce((SELECT max(edm.limit_next(edm.shaping_as_limit(l), p_at, 'UTC'))
                 FROM edm.shaping_limits l WHERE l.scope_key = ANY (p_keys)), p_at);
COMMENT ON FUNCTION edm.shaping_next(text[], timestamptz) IS
  'The earliest instant at or after p_at at which every shaping limit of the scopes p_keys (edm.shaping_key) admits one more send.';

-- The shared setter: replaces one scope's limits with p_limits (the JSON form
-- of edm.set_service_limits), keeping the state of unchanged limits.
CREATE FUNCTION edm.shaping_replace(p_scope text, p_site text, p_service_id bigint,
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
  'Replaces the shaping limits of one scope with p_limits, a JSON array of {name, kind, max_count, window_ms, burst, time_zone} as edm.set_service_limits takes; an unchanged limit keeps its state. Raises ED005 for a bad limit (nothing is changed). Called by the edm.set_*_limits functions, which check the scope''s target.';

CREATE FUNCTION edm.set_global_limits(p_limits jsonb)
RETURNS integer
LANGUAGE plpgsql
AS $$
BEGIN
  RETURN edm.shaping_replace('global', NULL, NULL, NULL, NULL, p_limits);
END;
$$;
COMMENT ON FUNCTION edm.set_global_limits(jsonb) IS
  'Replaces the global limits (every send of every service) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED005 for a bad limit.';

CREATE FUNCTION edm.set_site_limits(p_site text, p_limits jsonb, p_service_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
BEGIN
  IF p_site IS NULL THEN
    RAISE EXCEPTION 'set_site_limits: a site is required' USING ERRCODE = 'ED005';
  END IF;
  PERFORM 1 FROM edm.sites s WHERE s.site = p_site;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown site %', p_site USING ERRCODE = 'ED001';
  END IF;
  IF p_service_id IS NULL THEN
    RETURN edm.shaping_replace('site', p_site, NULL, NULL, NULL, p_limits);
  END IF;
  PERFORM 1 FROM edm.services s WHERE s.service_id = p_service_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('service_site', p_site, p_service_id, NULL, NULL, p_limits);
END;
$$;
COMMENT ON FUNCTION edm.set_site_limits(text, jsonb, bigint) IS
  'Replaces the limits of site p_site across all services (p_service_id NULL), or of service p_service_id to that site, with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown site or service, ED005 for a bad limit.';

CREATE FUNCTION edm.set_user_limits(p_user_id text, p_limits jsonb)
RETURNS integer
LANGUAGE plpgsql
AS $$
BEGIN
  -- the claim reads and advances user limits under the user row lock
  PERFORM 1 FROM edm.users u WHERE u.user_id = p_user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('user', NULL, NULL, p_user_id, NULL, p_limits);
END;
$$;
COMMENT ON FUNCTION edm.set_user_limits(text, jsonb) IS
  'Replaces the limits of user p_user_id (a tenant''s plan: per hour, per day...) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown user, ED005 for a bad limit.';

CREATE FUNCTION edm.set_task_limits(p_task_id bigint, p_limits jsonb)
RETURNS integer
LANGUAGE plpgsql
AS $$
BEGIN
  -- the claim reads and advances task limits under the task row lock
  PERFORM 1 FROM edm.tasks t WHERE t.task_id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('task', NULL, NULL, NULL, p_task_id, p_limits);
END;
$$;
COMMENT ON FUNCTION edm.set_task_limits(bigint, jsonb) IS
  'Replaces the limits of task p_task_id (a campaign''s maximum rate) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown task, ED005 for a bad limit.';

CREATE FUNCTION edm.set_task_transactional(p_task_id bigint, p_transactional boolean)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_status text;
BEGIN
  IF p_transactional IS NULL THEN
    RAISE EXCEPTION 'set_task_transactional: true or false is required' USING ERRCODE = 'ED005';
  END IF;
  SELECT t.status INTO v_status FROM edm.tasks t WHERE t.task_id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  IF v_status IN ('completed', 'cancelled', 'failed') THEN
    RAISE EXCEPTION 'task % is finished (%)', p_task_id, v_status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.tasks t SET transactional = p_transactional, updated_at = now()
  WHERE t.task_id = p_task_id AND t.transactional IS DISTINCT FROM p_transactional;
  RETURN p_transactional;
END;
$$;
COMMENT ON FUNCTION edm.set_task_transactional(bigint, boolean) IS
  'Puts task p_task_id in the transactional lane (true) or back in the bulk lane (false). ED001 for an unknown task, ED003 for a finished one.';

-- ---------------------------------------------------------------------------
-- Readiness of a higher-tier service, written once (issue 18)
-- ---------------------------------------------------------------------------

-- No sub-select inside, so the planner inlines it into the tier check.
CREATE FUNCTION edm.service_free_for_tier(s edm.services, p_horizon timestamptz, p_now timestamptz,
                                          p_taken bigint[])
RETURNS boolean
LANGUAGE sql STABLE
RETURN s.enabled AND s.next_available_at <= p_horizon
       AND edm.service_sent_today(s, p_now) < s.daily_quota
       AND (s.service_id <> ALL (p_taken)
            OR (s.interval_ms = 0 AND edm.service_sent_today(s, p_now) + 1 < s.daily_quota));
COMMENT ON FUNCTION edm.service_free_for_tier(edm.services, timestamptz, timestamptz, bigint[]) IS
  'True when service s can take a send by p_horizon (enabled, next slot due, under its daily quota at p_now) and is not busy in this claim (p_taken: services claimed already, unless s has no interval and quota left for one more). A user with such a service on a higher-priority grant is left to it (grant tiers). Inlined by the planner.';

-- The claim reads the shaping limits it needs once per call (these two
-- helpers) and keeps their state in memory until it writes it back.
CREATE FUNCTION edm.shaping_load(p_keys text[], OUT keys text[], OUT lims edm.service_limits[],
                                 OUT held text[])
LANGUAGE plpgsql
AS $$
BEGIN
  SELECT array_agg(x.k), array_agg(x.lim) INTO keys, lims
  FROM (SELECT l.scope_key AS k, edm.shaping_as_limit(l) AS lim
        FROM edm.shaping_limits l WHERE l.scope_key = ANY (p_keys)
        FOR UPDATE OF l SKIP LOCKED) x;
  held := ARRAY(SELECT a.scope_key FROM edm.shaping_limits a
                WHERE a.scope_key = ANY (p_keys)
                GROUP BY a.scope_key
                HAVING count(*) > coalesce(cardinality(array_positions(keys, a.scope_key)), 0));
END;
$$;
COMMENT ON FUNCTION edm.shaping_load(text[]) IS
  'For the claim: locks the shaping limits of the scopes p_keys without waiting (FOR UPDATE SKIP LOCKED) and returns them as edm.service_limits rows (keys: the scope_key of each) and the scopes with a limit locked by another transaction (held: no headroom for this claim).';

CREATE FUNCTION edm.shaping_free(p_keys text[], p_all_keys text[], p_lims edm.service_limits[],
                                 p_held text[], p_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_at timestamptz := p_at;
  i integer;
BEGIN
  IF p_keys && p_held THEN
    RETURN 'infinity';
  END IF;
  FOR i IN 1 .. coalesce(cardinality(p_all_keys), 0) LOOP
    IF p_all_keys[i] = ANY (p_keys) THEN
      v_at := greatest(v_at, edm.limit_next(p_lims[i], p_at, 'UTC'));
    END IF;
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
  -- (a recipient's site is read as edm.site_of does, written out: a SQL
  -- function holding a sub-select is not inlined, and a call of it is planned
  -- again in every execution of the statement; the domain is computed once
  -- (OFFSET 0), not once per row of the small edm.site_domains a plan scans)
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
      v_lsites := ARRAY(SELECT DISTINCT l.site FROM edm.shaping_limits l
                        WHERE l.scope = 'site'
                           OR (l.scope = 'service_site' AND l.service_id = v_svc.service_id));
    END IF;
    v_shaped := v_global OR v_user_lim OR v_task_lim OR v_tx
                OR cardinality(v_susp) > 0 OR cardinality(v_lsites) > 0;
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
    -- Batched fill (0014), for a service no limit shapes: no extra limit, no
    -- limited site, no user, task or global limit in use, no transactional
    -- work. Its suspended sites (fixed for the call) are left out as below.
    v_blocked := v_susp;
    IF NOT v_svc.has_limits
       AND NOT (v_global OR v_user_lim OR v_task_lim OR v_tx OR cardinality(v_lsites) > 0) THEN
      v_want := least(p_per_service, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      IF v_want > 0 THEN
        SELECT array_agg(b.user_id ORDER BY b.n), array_agg(b.task_id ORDER BY b.n),
               array_agg(b.sub_id ORDER BY b.n)
        INTO b_user, b_task, b_sub
        FROM (
          SELECT bc.n, bc.user_id, bt.task_id, coalesce(br.sub_id, bf.sub_id) AS sub_id
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
            SELECT bs0.subtask_id AS sub_id FROM edm.subtasks bs0
            WHERE bs0.task_id = bt.task_id AND bs0.status = 'pending'
              AND bs0.not_before > '-infinity' AND bs0.not_before <= v_now
              AND bs0.subtask_id <> ALL (c_sub)
              AND (cardinality(v_blocked) = 0
                   OR coalesce((SELECT sd.site FROM (SELECT edm.email_domain(bs0.email) AS d OFFSET 0) e
                                JOIN edm.site_domains sd ON sd.domain = e.d), '')
                      <> ALL (v_blocked))
            ORDER BY bs0.not_before, bs0.subtask_id
            LIMIT 1
            FOR UPDATE OF bs0 SKIP LOCKED) br ON true
          -- the fresh lookup runs only for a task without a due retry
          LEFT JOIN LATERAL (
            SELECT bs1.subtask_id AS sub_id FROM edm.subtasks bs1
            WHERE br.sub_id IS NULL
              AND bs1.task_id = bt.task_id AND bs1.status = 'pending'
              AND bs1.not_before = '-infinity'
              AND bs1.subtask_id <> ALL (c_sub)
              AND (cardinality(v_blocked) = 0
                   OR coalesce((SELECT sd.site FROM (SELECT edm.email_domain(bs1.email) AS d OFFSET 0) e
                                JOIN edm.site_domains sd ON sd.domain = e.d), '')
                      <> ALL (v_blocked))
            ORDER BY bs1.not_before, bs1.subtask_id
            LIMIT 1
            FOR UPDATE OF bs1 SKIP LOCKED) bf ON true) b;
        FOR i IN 1 .. coalesce(cardinality(b_user), 0) LOOP
          EXIT WHEN b_sub[i] IS NULL;
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
    END IF;
    -- One iteration per slot: each to the next user in the fair order
    -- (r_users rotates), or ahead of it to transactional work (0016).
    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
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
    v_ok_sites := '{}';
    v_tx_tried := '{}';
    v_tx_slot := v_tx AND v_tx_run < v_tx_max;
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
          SELECT st.subtask_id,
                 (CASE WHEN cardinality(v_lsites) > 0
                       THEN (SELECT sd.site FROM (SELECT edm.email_domain(st.email) AS d OFFSET 0) e
                             JOIN edm.site_domains sd ON sd.domain = e.d) END)
          INTO v_sub, v_site
          FROM edm.subtasks st
          WHERE st.task_id = v_task AND st.status = 'pending'
            AND st.not_before > '-infinity' AND st.not_before <= v_now
            AND st.subtask_id <> ALL (c_sub)
            AND (cardinality(v_blocked) = 0
                 OR coalesce((SELECT sd.site FROM (SELECT edm.email_domain(st.email) AS d OFFSET 0) e
                              JOIN edm.site_domains sd ON sd.domain = e.d), '') <> ALL (v_blocked))
          ORDER BY st.not_before, st.subtask_id
          LIMIT 1
          FOR UPDATE OF st SKIP LOCKED;
          IF v_sub IS NULL THEN
            SELECT st.subtask_id,
                   (CASE WHEN cardinality(v_lsites) > 0
                         THEN (SELECT sd.site FROM (SELECT edm.email_domain(st.email) AS d OFFSET 0) e
                               JOIN edm.site_domains sd ON sd.domain = e.d) END)
            INTO v_sub, v_site
            FROM edm.subtasks st
            WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before = '-infinity'
              AND st.subtask_id <> ALL (c_sub)
              AND (cardinality(v_blocked) = 0
                   OR coalesce((SELECT sd.site FROM (SELECT edm.email_domain(st.email) AS d OFFSET 0) e
                                JOIN edm.site_domains sd ON sd.domain = e.d), '') <> ALL (v_blocked))
            ORDER BY st.not_before, st.subtask_id
            LIMIT 1
            FOR UPDATE OF st SKIP LOCKED;
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
      FOR i IN 1 .. cardinality(m_keys) LOOP
        IF m_keys[i] = ANY (v_keys) THEN
          m_lims[i] := edm.limit_after(m_lims[i], v_slot, 'UTC', v_margin);
          m_dirty[i] := true;
        END IF;
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



-- ---------------------------------------------------------------------------
-- Waiting reasons
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.task_site_wait(p_task_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (reason text, until timestamptz)
LANGUAGE sql STABLE
BEGIN ATOMIC
  WITH next_sites AS (
    -- the sites of the task's next recipients (at most 1000, in claim order)
    SELECT DISTINCT edm.site_of(st.email) AS site
    FROM (SELECT s0.email FROM edm.subtasks s0
          WHERE s0.task_id = p_task_id AND s0.status = 'pending'
          ORDER BY s0.not_before, s0.subtask_id LIMIT 1000) st
  ), services AS (
    SELECT s.service_id FROM edm.tasks t
    JOIN edm.grants g ON g.user_id = t.user_id
    JOIN edm.services s ON s.service_id = g.service_id
    WHERE t.task_id = p_task_id AND s.enabled
  ), held AS (
    -- per site and service: when the site frees for it (NULL: free now)
    SELECT n.site, v.service_id,
           (SELECT max(x.until) FROM edm.site_suspensions x
            WHERE x.service_id = v.service_id AND x.site = n.site
              AND x.until > coalesce(p_now, now())) AS suspended_until,
           (SELECT max(edm.limit_next(edm.shaping_as_limit(l), coalesce(p_now, now()), 'UTC'))
            FROM edm.shaping_limits l
            WHERE l.scope_key IN (edm.shaping_key('site', n.site, NULL, NULL, NULL),
                                  edm.shaping_key('service_site', n.site, v.service_id, NULL, NULL))
           ) AS limit_free
    FROM next_sites n CROSS JOIN services v
    WHERE n.site IS NOT NULL
  ), per_site AS (
    SELECT h.site,
           min(greatest(h.suspended_until, nullif(h.limit_free, coalesce(p_now, now())))) AS free,
           bool_or(h.suspended_until IS NOT NULL) AS suspended,
           bool_or(h.limit_free > coalesce(p_now, now())) AS limited,
           bool_and(greatest(h.suspended_until, nullif(h.limit_free, coalesce(p_now, now())))
                    IS NOT NULL) AS held
    FROM held h GROUP BY h.site
  )
  SELECT 'sites held back: '
         || string_agg(format('%s %s until %s', p.site,
                              CASE WHEN p.suspended AND p.limited THEN 'suspended and limited'
                                   WHEN p.suspended THEN 'suspended' ELSE 'limited' END,
                              CASE WHEN p.free = 'infinity' THEN 'raised' ELSE p.free::text END),
                       '; ' ORDER BY p.free, p.site) AS reason,
         nullif(min(p.free), 'infinity') AS until
  FROM per_site p
  -- only when every next recipient has a site and each is held on every service
  HAVING count(*) > 0 AND bool_and(p.held)
     AND count(*) = (SELECT count(*) FROM next_sites n2)
     AND (SELECT count(*) FROM services) > 0;
END;
COMMENT ON FUNCTION edm.task_site_wait(bigint, timestamptz) IS
  'Why the sites of task p_task_id''s next recipients (the first 1000 pending, in claim order) hold it back at p_now: a row only when every one of them has a site that is suspended (edm.site_suspensions) or without headroom (site and service_site limits of edm.shaping_limits) on every enabled granted service, listing each site with when it frees; until is the first of them. No row when some recipient can go.';
CREATE OR REPLACE FUNCTION edm.task_wait_reason(p_task_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (reason text, until timestamptz)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  t edm.tasks;
  u edm.users;
  v_granted integer;
  v_enabled integer;
  v_ready integer;
  v_exhausted integer;
  v_backoff integer;
  v_next_interval timestamptz;
  v_next_quota timestamptz;
  v_next_backoff timestamptz;
  v_next_retry timestamptz;
  v_bind_service text;
  v_bind_limit text;
  v_bind_at timestamptz;
  v_shape record;
BEGIN
  SELECT * INTO t FROM edm.tasks WHERE task_id = p_task_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  SELECT * INTO u FROM edm.users WHERE user_id = t.user_id;
  IF t.status IN ('completed', 'cancelled', 'failed') THEN
    RETURN QUERY SELECT 'finished (' || t.status || ')', t.finished_at; RETURN;
  ELSIF t.status = 'draft' THEN
    IF u.quota_limit IS NOT NULL AND u.quota_used >= u.quota_limit THEN
      RETURN QUERY SELECT 'user quota exhausted', NULL::timestamptz; RETURN;
    END IF;
    RETURN QUERY SELECT 'draft: not submitted', NULL::timestamptz; RETURN;
  ELSIF t.status = 'expanding' THEN
    RETURN QUERY SELECT format('expanding recipients (%s so far)', t.total_count), NULL::timestamptz; RETURN;
  ELSIF t.status = 'paused' THEN
    RETURN QUERY SELECT 'paused', NULL::timestamptz; RETURN;
  ELSIF t.scheduled_at > v_now THEN
    RETURN QUERY SELECT 'scheduled later', t.scheduled_at; RETURN;
  ELSIF t.pending_count = 0 THEN
    RETURN QUERY SELECT 'sending: waiting for in-flight sends to complete', NULL::timestamptz; RETURN;
  END IF;

  -- >>> 0010_adoption: no live dispatcher, no sends (whatever the services say).
  IF edm.live_dispatcher_count(v_now) = 0 THEN
    RETURN QUERY SELECT 'no dispatcher running (no heartbeat in the last 30 s): start edm-sched dispatch',
                        NULL::timestamptz;
    RETURN;
  END IF;
  -- <<< 0010_adoption

  -- >>> 0016_shaping: a global, user or task limit without headroom binds
  -- whatever the services say (the one that frees last is named).
  SELECT x.what, x.name, x.free INTO v_shape
  FROM (SELECT CASE l.scope WHEN 'global' THEN 'global limit'
                            WHEN 'user' THEN format('user limit of %s', t.user_id)
                            ELSE 'task limit' END AS what,
               l.name, edm.limit_next(edm.shaping_as_limit(l), v_now, 'UTC') AS free
        FROM edm.shaping_limits l
        WHERE l.scope_key IN (edm.shaping_key('global', NULL, NULL, NULL, NULL),
                              edm.shaping_key('user', NULL, NULL, t.user_id, NULL),
                              edm.shaping_key('task', NULL, NULL, NULL, t.task_id))) x
  WHERE x.free > v_now
  ORDER BY x.free DESC, x.what, x.name
  LIMIT 1;
  IF FOUND THEN
    RETURN QUERY SELECT format('%s %s: no headroom until %s', v_shape.what, v_shape.name,
                               CASE WHEN v_shape.free = 'infinity' THEN 'it is raised (max_count 0)'
                                    ELSE v_shape.free::text END),
                        CASE WHEN v_shape.free < 'infinity' THEN v_shape.free END;
    RETURN;
  END IF;
  -- <<< 0016_shaping

  SELECT count(*), count(*) FILTER (WHERE s.enabled),
         count(*) FILTER (WHERE edm.service_is_ready(s, v_now)),
         count(*) FILTER (WHERE s.enabled AND (s.daily_quota = 0
                            OR edm.service_sent_today(s, v_now) >= s.daily_quota)),
         count(*) FILTER (WHERE s.enabled AND s.backoff_until > v_now),
         min(edm.ts_add_ms(s.last_sent_at, s.interval_ms)) FILTER (WHERE s.enabled),
         min(coalesce(s.quota_exhausted_until, edm.service_next_quota_day(s.quota_tz, v_now)))
           FILTER (WHERE s.enabled AND s.daily_quota > 0
                   AND edm.service_sent_today(s, v_now) >= s.daily_quota),
         min(s.backoff_until) FILTER (WHERE s.enabled AND s.backoff_until > v_now)
  INTO v_granted, v_enabled, v_ready, v_exhausted, v_backoff, v_next_interval, v_next_quota,
       v_next_backoff
  FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
  WHERE g.user_id = t.user_id;

  SELECT min(st.not_before) INTO v_next_retry FROM edm.subtasks st
  WHERE st.task_id = t.task_id AND st.status = 'pending';

  IF v_granted = 0 THEN
    RETURN QUERY SELECT 'no granted service', NULL::timestamptz;
  ELSIF v_enabled = 0 THEN
    RETURN QUERY SELECT 'all granted services disabled', NULL::timestamptz;
  ELSIF v_next_retry > v_now THEN
    RETURN QUERY SELECT 'retries waiting for their back-off', v_next_retry;
  ELSIF v_ready > 0 THEN
    -- >>> 0016_shaping: every site of the task's next recipients held back
    -- (suspended or without headroom on each granted service) binds.
    SELECT r.reason, r.until INTO v_shape FROM edm.task_site_wait(p_task_id, v_now) r;
    IF FOUND THEN
      RETURN QUERY SELECT v_shape.reason, v_shape.until;
      RETURN;
    END IF;
    -- <<< 0016_shaping
    RETURN QUERY SELECT 'in rotation: a granted service is ready; waiting for its turn among users',
                        NULL::timestamptz;
  ELSIF v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'service quotas exhausted', v_next_quota;
  ELSIF v_backoff + v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'granted services unhealthy (backing off)', least(v_next_backoff, v_next_quota);
  ELSE
    -- Name the limit that binds (0008): on the granted service that frees first.
    SELECT s.name, b.limit_name, b.free_at INTO v_bind_service, v_bind_limit, v_bind_at
    FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
    CROSS JOIN LATERAL edm.service_binding_limit(s, v_now) b
    WHERE g.user_id = t.user_id AND s.enabled
      AND (s.backoff_until IS NULL OR s.backoff_until <= v_now)
    ORDER BY b.free_at, s.service_id
    LIMIT 1;
    IF v_bind_limit IS NULL THEN
      RETURN QUERY SELECT 'all granted services throttled', v_next_interval;
    ELSE
      RETURN QUERY SELECT format('all granted services throttled: first to free is %s, held by its %s limit',
                                 v_bind_service, v_bind_limit), v_bind_at;
    END IF;
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.task_wait_reason(bigint, timestamptz) IS
  'Why task p_task_id is not sending right now, and until when if known: scheduled later, paused, expanding, no dispatcher running (no live heartbeat, see edm.live_dispatcher_count), a global, user or task limit without headroom until T (edm.shaping_limits, naming the limit), sites held back (the sites of its next recipients suspended or limited on every granted service, see edm.task_site_wait), no granted service, all granted services disabled, throttled until T (naming the service that frees first and its binding limit: interval, daily_quota or an extra limit of edm.service_limits), quotas exhausted until T, backing off until T, retries in back-off until T, user quota exhausted, or in rotation.';

-- ---------------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------------

CREATE VIEW edm.shaping_limit_status AS
SELECT x.scope, x.site, x.service_id, x.user_id, x.task_id, x.limit_name, x.kind, x.max_count,
       x.window_ms, x.burst, x.used, greatest(x.max_count - x.used, 0) AS headroom, x.next_free_at
FROM (
  SELECT l.scope, l.site, l.service_id, l.user_id, l.task_id, l.name AS limit_name, l.kind,
         l.max_count, l.window_ms, l.burst,
         CASE l.kind
           WHEN 'calendar_day' THEN CASE WHEN l.day = (now() AT TIME ZONE coalesce(l.time_zone, 'UTC'))::date
                                         THEN l.day_count ELSE 0 END
           WHEN 'rolling' THEN (SELECT coalesce(sum(b.n), 0)::integer
                                FROM unnest(l.bucket_idx, l.bucket_n) AS b(i, n)
                                WHERE b.i >= edm.epoch_ms(now()) / edm.limit_bucket_ms(l.window_ms)
                                             - ceil(l.window_ms::numeric / edm.limit_bucket_ms(l.window_ms)))
           ELSE least(l.burst, greatest(0, ceil(extract(epoch FROM (coalesce(l.tat, now()) - now())) * 1000
                                               / (l.window_ms::numeric / greatest(l.max_count, 1))))::integer)
         END AS used,
         nullif(edm.limit_next(edm.shaping_as_limit(l), now(), 'UTC'), now()) AS next_free_at
  FROM edm.shaping_limits l
) x;
COMMENT ON VIEW edm.shaping_limit_status IS
  'Every shaping limit (edm.shaping_limits: global, site, service_site, user, task) with its use, headroom and when it next admits a send (NULL: now).';
COMMENT ON COLUMN edm.shaping_limit_status.scope IS 'global, site, service_site, user or task.';
COMMENT ON COLUMN edm.shaping_limit_status.site IS 'Site (site and service_site scopes).';
COMMENT ON COLUMN edm.shaping_limit_status.service_id IS 'Service (service_site scope).';
COMMENT ON COLUMN edm.shaping_limit_status.user_id IS 'User (user scope).';
COMMENT ON COLUMN edm.shaping_limit_status.task_id IS 'Task (task scope).';
COMMENT ON COLUMN edm.shaping_limit_status.limit_name IS 'Name of the limit.';
COMMENT ON COLUMN edm.shaping_limit_status.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.shaping_limit_status.max_count IS 'Most sends per window.';
COMMENT ON COLUMN edm.shaping_limit_status.window_ms IS 'Window in milliseconds (NULL for a calendar day).';
COMMENT ON COLUMN edm.shaping_limit_status.burst IS 'Most sends at once (rate limits).';
COMMENT ON COLUMN edm.shaping_limit_status.used IS 'Sends counted in the current window (rate: in the token bucket).';
COMMENT ON COLUMN edm.shaping_limit_status.headroom IS 'max_count - used, at least 0.';
COMMENT ON COLUMN edm.shaping_limit_status.next_free_at IS 'When the limit next admits a send; NULL when it does now (infinity: max_count 0).';

CREATE VIEW edm.site_status AS
SELECT st.site, st.description,
       (SELECT count(*) FROM edm.site_domains d WHERE d.site = st.site)::integer AS domains,
       ARRAY(SELECT x.service_id FROM edm.site_suspensions x
             WHERE x.site = st.site AND x.until > now() ORDER BY x.service_id) AS suspended_services,
       (SELECT max(x.until) FROM edm.site_suspensions x
        WHERE x.site = st.site AND x.until > now()) AS suspended_until,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                  'scope', ls.scope, 'service_id', ls.service_id, 'name', ls.limit_name,
                  'kind', ls.kind, 'max_count', ls.max_count, 'window_ms', ls.window_ms,
                  'headroom', ls.headroom, 'next_free_at', ls.next_free_at)
                ORDER BY ls.scope, ls.service_id, ls.limit_name), '[]'::jsonb)
        FROM edm.shaping_limit_status ls WHERE ls.site = st.site) AS limits,
       (SELECT max(ls.next_free_at) FROM edm.shaping_limit_status ls
        WHERE ls.site = st.site AND ls.scope = 'site') AS limited_until
FROM edm.sites st;
COMMENT ON VIEW edm.site_status IS
  'Per destination site: its domains, the services suspended for it now and until when, and its limits (site scope and per service) with headroom.';
COMMENT ON COLUMN edm.site_status.site IS 'Site.';
COMMENT ON COLUMN edm.site_status.description IS 'Whose mail system it is.';
COMMENT ON COLUMN edm.site_status.domains IS 'Domains mapped to the site.';
COMMENT ON COLUMN edm.site_status.suspended_services IS 'Services suspended for the site now (edm.site_suspensions).';
COMMENT ON COLUMN edm.site_status.suspended_until IS 'End of the latest suspension in force; NULL when none.';
COMMENT ON COLUMN edm.site_status.limits IS 'Its limits, site scope and service_site scope, as JSON objects {scope, service_id, name, kind, max_count, window_ms, headroom, next_free_at}.';
COMMENT ON COLUMN edm.site_status.limited_until IS 'When the site''s own (all-services) limits next admit a send; NULL when they do now or there are none.';

-- ---------------------------------------------------------------------------
-- Roles: the new names in the group roles' grants (the pattern of 0009)
-- ---------------------------------------------------------------------------

SELECT edm.extend_roles(ARRAY[
    ['v_app_fns text[] := ARRAY[',
     'v_app_fns text[] := ARRAY[''set_global_limits'', ''set_site_limits'', ''set_user_limits'', ''set_task_limits'', ''set_task_transactional'', ''shaping_as_limit'', ''limit_next'', ''limit_bucket_ms'', ''epoch_ms'', ''shaping_key'', '],
    ['v_monitor_fns text[] := ARRAY[',
     'v_monitor_fns text[] := ARRAY[''task_site_wait'', ''shaping_as_limit'', ''limit_next'', ''limit_bucket_ms'', ''epoch_ms'', ''shaping_key'', '],
    ['edm.config, edm.task_progress, ',
     'edm.config, edm.task_progress, edm.shaping_limits, edm.shaping_limit_status, edm.site_status, ']], '0016');

SELECT edm.harden_functions();
