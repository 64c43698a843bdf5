-- 0020_wire_pacing: a lane's report of its pace moves the rate limits too
-- (issue 14 point 2).
--
-- A lane paces its starts from the provider's acknowledgement of the previous
-- ones (edm_sched/lanes.py): a start that reached the provider late shifts
-- the provider's token bucket, and so the lane's, for every later send. The
-- claim's slots come from the database's bucket (edm.service_limits.tat),
-- which knew nothing of it, so a service's slots stayed ahead of what its lane
-- could send by the first start's delay. edm.report_pace now also moves each
-- rate limit of a reported service so that its next admitted instant is no
-- earlier than the reported one (tat >= next start + the burst's tolerance):
-- the slots claimed afterwards follow the wire, for rate limits as for the
-- interval. Only ever later, so no limit can be broken by a report.

CREATE OR REPLACE FUNCTION edm.report_pace(p_owner text, p_service_ids bigint[], p_next_starts timestamptz[])
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
  WITH moved AS (
    UPDATE edm.services s
    SET last_sent_at = greatest(s.last_sent_at, x.next_start - s.interval_ms * interval '1 millisecond')
    FROM (SELECT y.service_id, y.next_start FROM unnest(p_service_ids, p_next_starts)
            AS y(service_id, next_start)
          ORDER BY y.service_id) x
    WHERE s.service_id = x.service_id AND s.held_by = p_owner
      AND s.service_id IN (SELECT z.service_id FROM edm.services z
                           WHERE z.service_id = ANY (p_service_ids) AND z.held_by = p_owner
                           ORDER BY z.service_id FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING s.service_id, x.next_start
  ),
  -- each rate limit admits its next send at tat - (burst - 1) * T (GCRA): no
  -- earlier than the reported start
  rates AS (
    UPDATE edm.service_limits l
    SET tat = greatest(l.tat, m.next_start
                              + ((l.burst - 1) * l.window_ms::double precision / l.max_count)
                                * interval '1 millisecond')
    FROM moved m
    WHERE l.service_id = m.service_id AND l.kind = 'rate' AND l.max_count > 0
    RETURNING l.service_id
  )
  SELECT count(*) INTO v_n FROM moved;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.report_pace(text, bigint[], timestamptz[]) IS
  'A dispatcher whose lane of a held service runs late (its sends start after their slots: a stalled event loop, a slow server, a start the provider saw late) tells when the service''s next send can really start; the service''s next slot moves there (never earlier): its interval counts from there and each of its rate limits admits no send before it. Slots claimed afterwards follow the wire instead of piling up lateness. Services not held by p_owner, or locked by a claim, are left alone. Returns how many moved.';

-- The dispatcher reads its services' rate limits to pace its lanes
-- (edm_sched/dispatcher.py, the dispatch_services query): the dispatcher role
-- may read edm.service_limits (the pattern of 0009).
SELECT edm.extend_roles(ARRAY[[
  'edm.tasks, edm.system_health, edm.jobs, edm.job_executions TO %I'', p_dispatcher',
  'edm.tasks, edm.system_health, edm.jobs, edm.job_executions, edm.service_limits TO %I'', p_dispatcher']],
  '0020');

SELECT edm.harden_functions();
