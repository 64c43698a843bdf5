-- 0025_service_site_rules: the shaped claim stops repeating work it finds
-- useless on every call (issue 15, claim cost: 1.58-1.74x the unshaped S3
-- claim before, goal 1.5; docs/performance.md, "The shaped claim's cost,
-- again").
--
-- Late in a drain a claim visits about a hundred ready services to fill 50
-- slots. Shaping added about 9 ms to such a call (S3 x 0.1 after 750 calls):
--
-- * every visited service's own site rules were read, two or three probes,
--   whether it had any or not: services.site_rules_until (kept by statement
--   triggers) says, on the row the claim has already read, until when there
--   is anything to read;
-- * a service whose small pool had nothing outside its suspended sites cost a
--   fill, a slot of the slot-by-slot path and a walk of each task, 0.4 ms,
--   on every call: edm.task_sendable_outside answers with one probe per
--   domain of a task, and the claim skips such a service;
-- * the slots after a fill searched again tasks the fill had found empty,
--   the fill queried flags it could read, the slot checks called
--   edm.shaping_free for scopes without limits, and two IF conditions
--   holding a query ran as queries at every slot.
--
-- The decisions stay those of 0016 (tests/sql/test_shaped_claim_equivalence.py).

ALTER TABLE edm.services ADD COLUMN site_rules_until timestamptz;
COMMENT ON COLUMN edm.services.site_rules_until IS
  'Until when the claim must read this service''s own site rules: infinity while it has (service, site) limits in edm.shaping_limits, else the latest until of its rows in edm.site_suspensions, else NULL. Kept by triggers on both tables (edm.service_site_rules_sync).';

CREATE FUNCTION edm.service_site_rules_sync(p_service_ids bigint[])
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
  UPDATE edm.services s
  SET site_rules_until = r.until
  FROM (SELECT k.service_id,
               CASE WHEN EXISTS (SELECT 1 FROM edm.shaping_limits l
                                 WHERE l.scope = 'service_site' AND l.service_id = k.service_id)
                    THEN 'infinity'::timestamptz
                    ELSE (SELECT max(x.until) FROM edm.site_suspensions x
                          WHERE x.service_id = k.service_id) END AS until
        FROM unnest(p_service_ids) AS k(service_id)) r
  WHERE s.service_id = r.service_id
    AND s.site_rules_until IS DISTINCT FROM r.until;
END;
COMMENT ON FUNCTION edm.service_site_rules_sync(bigint[]) IS
  'Recomputes services.site_rules_until of the services p_service_ids from their (service, site) limits and site suspensions (rows left unchanged where it is right already). Called by the triggers of edm.site_suspensions and edm.shaping_limits.';

CREATE FUNCTION edm.site_suspensions_sync()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM edm.service_site_rules_sync(ARRAY(SELECT DISTINCT c.service_id FROM changed c));
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.site_suspensions_sync() IS
  'Statement trigger on edm.site_suspensions: keeps services.site_rules_until of the services whose suspensions changed.';
CREATE TRIGGER site_suspensions_sync_ins AFTER INSERT ON edm.site_suspensions
  REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
CREATE TRIGGER site_suspensions_sync_upd AFTER UPDATE ON edm.site_suspensions
  REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
CREATE TRIGGER site_suspensions_sync_del AFTER DELETE ON edm.site_suspensions
  REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
COMMENT ON TRIGGER site_suspensions_sync_ins ON edm.site_suspensions IS
  'Moves services.site_rules_until to a new suspension''s end.';
COMMENT ON TRIGGER site_suspensions_sync_upd ON edm.site_suspensions IS
  'Moves services.site_rules_until when a suspension is extended, renewed or shortened.';
COMMENT ON TRIGGER site_suspensions_sync_del ON edm.site_suspensions IS
  'Moves services.site_rules_until back when a suspension is lifted.';

-- The (service, site) limits: the trigger that keeps the user and task flags
-- keeps the services' too.
SELECT edm.patch_function('edm.shaping_limits_flag()'::regprocedure, ARRAY[[
$p$  RETURN NULL;$p$,
$p$  PERFORM edm.service_site_rules_sync(ARRAY(SELECT DISTINCT x.service_id FROM changed x
                                             WHERE x.scope = 'service_site'));
  RETURN NULL;$p$]], '0025');
COMMENT ON FUNCTION edm.shaping_limits_flag() IS
  'Statement trigger on edm.shaping_limits: keeps users.has_limits, tasks.has_limits and services.site_rules_until in step, so the claim reads user, task and (service, site) limits only where there are some.';

SELECT edm.service_site_rules_sync(ARRAY(SELECT s.service_id FROM edm.services s));

-- The claim: the ready service's row says whether to read its own rules.
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today$p$,
$p$           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today,
           s.site_rules_until > v_now AS own_site_rules$p$], [
$p$    IF v_susp_any THEN
      v_susp := ARRAY($p$,
$p$    -- (only a service whose row says it has some: 0025)
    IF v_susp_any AND v_svc.own_site_rules THEN
      v_susp := ARRAY($p$], [
$p$      v_lsites := v_all_lsites || ARRAY(
        SELECT DISTINCT l.site FROM edm.shaping_limits l
        WHERE l.scope = 'service_site' AND l.service_id = v_svc.service_id
          AND l.site <> ALL (v_all_lsites));$p$,
$p$      v_lsites := v_all_lsites;
      IF v_svc.own_site_rules THEN
        v_lsites := v_lsites || ARRAY(
          SELECT DISTINCT l.site FROM edm.shaping_limits l
          WHERE l.scope = 'service_site' AND l.service_id = v_svc.service_id
            AND l.site <> ALL (v_all_lsites));
      END IF;$p$]], '0025');


-- The fill reads its tasks' has_limits flags itself and its users' in one
-- statement (one statement fewer per fill), and the slots after it do not
-- look again in a task the fill found nothing in: a task without a recipient outside the
-- service's suspended sites at the fill has none at the service's later slots
-- either (the sites a slot leaves out only grow from those, the recipients
-- taken only grow, and the claim's now is fixed). Late in a drain, a service
-- whose users' work is all at a suspended site was searched twice per call.
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_key      text;
BEGIN$p$,
$p$  v_key      text;
  -- 0025: the fill's users' and tasks' has_limits flags, and the tasks it
  -- found nothing in at the current service (its later slots skip them)
  b_ulim     boolean[];
  b_tlim     boolean[];
  v_empty    bigint[];
BEGIN$p$], [
$p$    v_tx_run := v_svc.tx_run;$p$,
$p$    v_empty := '{}';
    v_tx_run := v_svc.tx_run;$p$], [
$p$               array_agg(b.sub_id ORDER BY b.n), array_agg(b.domain ORDER BY b.n)
        INTO b_user, b_task, b_sub, b_site$p$,
$p$               array_agg(b.sub_id ORDER BY b.n), array_agg(b.domain ORDER BY b.n),
               array_agg(b.tlim ORDER BY b.n)
        INTO b_user, b_task, b_sub, b_site, b_tlim$p$], [
$p$                 coalesce(br.domain, bf.domain, bx.domain) AS domain
          FROM (
            SELECT c.user_id, c.n
$p$,
$p$                 coalesce(br.domain, bf.domain, bx.domain) AS domain,
                 bt.has_limits AS tlim
          FROM (
            SELECT c.user_id, c.n
$p$], [
$p$            SELECT bt0.task_id FROM edm.tasks bt0$p$,
$p$            SELECT bt0.task_id, bt0.has_limits FROM edm.tasks bt0$p$], [
$p$          -- the users and tasks with limits (their rows are locked by this
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
$p$,
$p$          FOR i IN 1 .. cardinality(b_sub) LOOP
            EXIT WHEN b_sub[i] IS NULL;
            -- the users and tasks with limits (their rows are locked by this
            -- call, so their flags cannot change meanwhile)
            IF v_user_lim AND b_ulim[i] THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim AND b_tlim[i] THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;
$p$], [
$p$        -- Every shaping layer, at each slot as the loop below checks it$p$,
$p$        -- (the users' flags only where users have limits: one statement
        -- per fill in such a world, none in others)
        b_ulim := NULL;
        IF v_user_lim AND b_user IS NOT NULL THEN
          b_ulim := ARRAY(SELECT u.has_limits
                          FROM unnest(b_user) WITH ORDINALITY AS x(user_id, n)
                          JOIN edm.users u ON u.user_id = x.user_id
                          ORDER BY x.n);
        END IF;
        IF array_position(b_sub, NULL) IS NOT NULL THEN
          FOR i IN 1 .. cardinality(b_sub) LOOP
            IF b_sub[i] IS NULL AND b_task[i] IS NOT NULL THEN
              v_empty := v_empty || b_task[i];
            END IF;
          END LOOP;
        END IF;
        -- Every shaping layer, at each slot as the loop below checks it$p$], [
$p$          AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (r_tasks)$p$,
$p$          AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (r_tasks)
          AND t.task_id <> ALL (v_empty)$p$], [
$p$          WHERE t.task_id = ANY (r_tasks) AND t.user_id = v_user AND t.claimable
            AND t.task_id <> ALL (v_tried)$p$,
$p$          WHERE t.task_id = ANY (r_tasks) AND t.user_id = v_user AND t.claimable
            AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (v_empty)$p$]], '0025');


-- The checks of a slot look up only the scopes that can have limits: a
-- (service, site) scope where the service has site rules, a user or task
-- scope where its flag says so (each lookup scans the limits the call has
-- read); and the fill finds the scopes it has not read yet without a query.
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$              v_keys := v_keys || ARRAY[edm.shaping_key('site', b_site[i], NULL, NULL, NULL),
                                        edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                        NULL, NULL)];$p$,
$p$              v_keys := v_keys || edm.shaping_key('site', b_site[i], NULL, NULL, NULL);
              IF v_svc.own_site_rules THEN
                v_keys := v_keys || edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                    NULL, NULL);
              END IF;$p$], [
$p$          v_keys := ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL),
                          edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL)];$p$,
$p$          v_keys := ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL)];
          IF v_svc.own_site_rules THEN
            v_keys := v_keys || edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL);
          END IF;$p$], [
$p$        v_keys := v_keys || ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL),
                                  edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL)];$p$,
$p$        v_keys := v_keys || edm.shaping_key('site', v_site, NULL, NULL, NULL);
        IF v_svc.own_site_rules THEN
          v_keys := v_keys || edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL);
        END IF;$p$], [
$p$            IF v_user_lim THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;$p$,
$p$            IF v_user_lim AND b_ulim[i] THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim AND b_tlim[i] THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;$p$], [
$p$          v_keys := ARRAY(SELECT DISTINCT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen));$p$,
$p$          v_nk := '{}';  -- the scopes not read yet, each once
          FOREACH v_key IN ARRAY v_keys LOOP
            IF v_key <> ALL (m_seen) AND v_key <> ALL (v_nk) THEN
              v_nk := v_nk || v_key;
            END IF;
          END LOOP;
          v_keys := v_nk;$p$]], '0025');

-- A service whose users' work is all at its suspended sites. Each claim found
-- that out again with the fill and a slot of the slot-by-slot path (a user
-- lookup, its tasks, a walk of each task's recipients): 0.4 ms a service, and
-- late in a drain the S3 world had ten such services in every call, more than
-- half of what shaping added to a call. One probe per task now answers it.
CREATE FUNCTION edm.task_sendable_outside(p_task_id bigint, p_now timestamptz,
                                          p_skip_domains text[])
RETURNS boolean
LANGUAGE plpgsql
STABLE STRICT
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_dom text;
  v_nb  timestamptz;
  i     integer;
BEGIN
  -- The task's pending recipients' domains in order, each with its earliest
  -- recipient: one probe of subtasks_domain_idx per domain (the order by
  -- domain, then not_before, is that index's and no other's), until one not
  -- skipped has a recipient due.
  SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s
  WHERE s.task_id = p_task_id AND s.status = 'pending'
  ORDER BY s.domain, s.not_before
  LIMIT 1;
  FOR i IN 1 .. 32 LOOP
    IF v_dom IS NULL THEN
      RETURN false;
    END IF;
    IF v_dom <> ALL (p_skip_domains) AND v_nb <= p_now THEN
      RETURN true;
    END IF;
    SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s
    WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain > v_dom
    ORDER BY s.domain, s.not_before
    LIMIT 1;
  END LOOP;
  RETURN true;  -- (32 domains without one: not worth looking further, say yes)
END;
$$;
COMMENT ON FUNCTION edm.task_sendable_outside(bigint, timestamptz, text[]) IS
  'For the claim: false only when task p_task_id has no pending recipient due at p_now (fresh, returned or a due retry) outside the domains p_skip_domains. Walks the task''s pending domains on subtasks_domain_idx, at most 32, and answers true past them (true may be wrong, false never is).';

SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$    -- Batched fill (0014), for a service without extra limits whose slots all$p$,
$p$    -- A small pool with no work outside the service's suspended sites: the
    -- fill and the slots would find nothing (0025).
    -- (two IFs: a condition holding a query is a query, whatever its first
    -- operand says)
    IF cardinality(v_sdom) > 0 AND v_pool IS NOT NULL AND NOT v_svc.has_limits THEN
      IF NOT EXISTS (SELECT 1 FROM edm.tasks t
                     WHERE t.user_id = ANY (v_pool) AND t.claimable
                       AND edm.task_sendable_outside(t.task_id, v_now, v_sdom)) THEN
        CONTINUE;
      END IF;
    END IF;
    -- Batched fill (0014), for a service without extra limits whose slots all$p$]], '0025');

-- The slot-by-slot checks call edm.shaping_free only for scopes with a limit
-- read or held (a user or task without limits is most of them: the call cost
-- 10 us a slot and scope for nothing).
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot);$p$,
$p$CASE WHEN v_keys && m_keys OR v_keys && m_held
                    THEN edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot) ELSE v_slot END;$p$]],
  '0025');

-- A PL/pgSQL condition that holds a query runs as a query, whatever its first
-- operand: the user and task flags of the slot-by-slot path were read through
-- the executor at every slot (5 us each) although the scope was known after
-- its first slot.
SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$        IF NOT v_keys <@ m_seen
           AND NOT coalesce((SELECT u.has_limits FROM edm.users u WHERE u.user_id = v_user), true) THEN
          m_seen := m_seen || v_keys;
        END IF;$p$,
$p$        IF NOT v_keys <@ m_seen THEN
          IF NOT coalesce((SELECT u.has_limits FROM edm.users u WHERE u.user_id = v_user), true) THEN
            m_seen := m_seen || v_keys;
          END IF;
        END IF;$p$], [
$p$          IF NOT v_keys <@ m_seen
             AND NOT coalesce((SELECT t.has_limits FROM edm.tasks t WHERE t.task_id = v_task), true) THEN
            m_seen := m_seen || v_keys;
          END IF;$p$,
$p$          IF NOT v_keys <@ m_seen THEN
            IF NOT coalesce((SELECT t.has_limits FROM edm.tasks t WHERE t.task_id = v_task), true) THEN
              m_seen := m_seen || v_keys;
            END IF;
          END IF;$p$]], '0025');

SELECT edm.harden_functions();
