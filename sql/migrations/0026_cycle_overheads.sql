-- 0026_cycle_overheads: four costs every claim and completion paid for
-- nothing (issue 14, S1 throughput; docs/performance.md, "S1 after session 7").
--
-- Found with perf on the server during raw S1 cycles (a claim of 50 and its
-- completion each; S1 x 0.3) and counted with track_functions = 'all':
--
-- * the claim sorted every ready service, whole rows, on every call (below,
--   with the patch of edm.claim_v2);
-- * edm.config_int / edm.config_num were SQL functions that no caller can
--   inline (a sub-SELECT under a PL/pgSQL assignment), so every call parsed
--   and planned its body again: 11 calls a cycle, about 80 us each. As
--   PL/pgSQL functions their one query is planned once per session.
-- * The statement triggers of edm.site_suspensions (0025) fire for the
--   completion's INSERT ... ON CONFLICT even when it inserts nothing, which
--   is every completion without a throttling reply, and each ran
--   edm.service_site_rules_sync on an empty list: about 0.4 ms, twice a
--   completion. They now return at once when no row changed.
-- * CHECK constraints are evaluated on every UPDATE of a row, whatever
--   columns change. Two on edm.services called functions (edm.headers_problem,
--   a jsonb walk, about 90 us; edm.is_valid_timezone, an exception block):
--   about 100 us for each service row a claim or completion touches. They
--   become one BEFORE trigger that runs only when settings or quota_tz are
--   written, and raises the same check_violation with the same constraint
--   names.

CREATE OR REPLACE FUNCTION edm.config_int(p_key text)
RETURNS integer
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
  RETURN (SELECT (c.value #>> '{}')::numeric::integer FROM edm.config c WHERE c.key = p_key);
END;
$$;

CREATE OR REPLACE FUNCTION edm.config_num(p_key text)
RETURNS numeric
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
  RETURN (SELECT (c.value #>> '{}')::numeric FROM edm.config c WHERE c.key = p_key);
END;
$$;

CREATE OR REPLACE FUNCTION edm.site_suspensions_sync()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_ids bigint[];
BEGIN
  v_ids := ARRAY(SELECT DISTINCT c.service_id FROM changed c);
  -- statement triggers fire for statements that changed no row (a
  -- completion's INSERT ... ON CONFLICT without a throttling reply)
  IF cardinality(v_ids) > 0 THEN
    PERFORM edm.service_site_rules_sync(v_ids);
  END IF;
  RETURN NULL;
END;
$$;

ALTER TABLE edm.services DROP CONSTRAINT services_headers_ok,
                         DROP CONSTRAINT services_quota_tz_check;

CREATE FUNCTION edm.services_check_settings()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_problem text;
BEGIN
  v_problem := edm.headers_problem(NEW.settings -> 'headers');
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'new row for relation "services" violates check constraint "services_headers_ok"'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'services_headers_ok',
            SCHEMA = 'edm', TABLE = 'services', DETAIL = v_problem;
  END IF;
  IF NOT edm.is_valid_timezone(NEW.quota_tz) THEN
    RAISE EXCEPTION 'new row for relation "services" violates check constraint "services_quota_tz_check"'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'services_quota_tz_check',
            SCHEMA = 'edm', TABLE = 'services',
            DETAIL = format('unknown time zone %s', quote_literal(NEW.quota_tz));
  END IF;
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.services_check_settings() IS
  'Trigger on edm.services: refuses custom header fields edm.headers_problem finds wrong (check_violation, constraint services_headers_ok) and a quota_tz PostgreSQL does not know (services_quota_tz_check). A trigger rather than CHECK constraints, which would run on every update of the row (the claim and the completion update services on every call).';
REVOKE ALL ON FUNCTION edm.services_check_settings() FROM PUBLIC;

CREATE TRIGGER services_check_settings BEFORE INSERT OR UPDATE OF settings, quota_tz
  ON edm.services FOR EACH ROW EXECUTE FUNCTION edm.services_check_settings();
COMMENT ON TRIGGER services_check_settings ON edm.services IS
  'Checks settings.headers and quota_tz when a row is inserted or either column is written.';

-- The claim ranked every ready service on every call, and sorted them whole:
-- the cursor's rows (a dozen columns, a text among them, and the row
-- locator) were compared through the sort key computed per row. In S1 all
-- 1,000 services are ready and a call of 50 uses about four: the sort was
-- 2 ms of a 9 ms call (perf: 16 % of the server's CPU in a raw S1 cycle).
-- The ranking is now a narrow top-N (the services' ids in the same order,
-- LIMIT 2 x batch + 8), and the services are locked from that list in that
-- order, their readiness checked again. A call that uses up the list before
-- its batch is full ranks all the services it has not seen yet: the same
-- services in the same order as before, in at most two rankings (a call that
-- needs the second one, because many ready services have nothing to give,
-- pays about what the full sort cost).
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_stop     boolean := false;$p$,
$p$  v_stop     boolean := false;
  -- 0026: the current list of ranked services, and the most it may hold
  v_order    bigint[] := '{}';
  v_lim      integer;$p$], [
$p$  FOR v_svc IN
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits, s.tx_run,
           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today,
           s.site_rules_until > v_now AS own_site_rules
    FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
      AND s.service_id <> ALL (p_skip_services)
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP$p$,
$p$  -- (0026: ranked as a list of ids, a top-N, then locked from the list in
  -- its order; a call the list does not fill ranks all the services not seen yet)
  v_lim := 2 * p_batch + 8;
  <<ranked>>
  LOOP
  v_order := ARRAY(
    SELECT s.service_id FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
      AND s.service_id <> ALL (p_skip_services)
      AND s.service_id <> ALL (v_order)  -- the second ranking: all but the first list
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    LIMIT v_lim);
  EXIT ranked WHEN cardinality(v_order) = 0;
  FOR v_svc IN
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits, s.tx_run,
           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today,
           s.site_rules_until > v_now AS own_site_rules
    FROM edm.services s
    WHERE s.service_id = ANY (v_order)
      AND s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP$p$], [
$p$    EXIT WHEN cardinality(c_sub) >= p_batch OR v_stop;
  END LOOP;$p$,
$p$    EXIT WHEN cardinality(c_sub) >= p_batch OR v_stop;
  END LOOP;
  EXIT ranked WHEN cardinality(c_sub) >= p_batch OR v_stop OR cardinality(v_order) < v_lim;
  v_lim := 2147483647;  -- the rest, in one ranking
  END LOOP ranked;$p$]], '0026');
