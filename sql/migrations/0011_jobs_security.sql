-- 0011_jobs_security.sql: what tenants' jobs may reach and run.
--
-- * jobs.http_allow: the networks and host names the host opens to http jobs
--   (all jobs, platform jobs, or one tenant's), checked by the Python outbound
--   guard at the door and before every connection (edm_sched/jobs/guard.py).
-- * jobs.shell_tenants: the tenants whose jobs may be shell commands; a
--   tenant's shell job is refused unless jobs.shell_enabled and the tenant is
--   listed (platform jobs, without a tenant, need only jobs.shell_enabled).
-- * jobs.max_running_per_tenant: most executions of one tenant running at
--   once, whatever their kind, enforced by edm.job_claim.
-- * error kind "blocked": a run the outbound guard refused; never retried.
-- Secrets of http jobs are references (SecretRef, basic_auth.password_ref)
-- resolved by the runner: no new column holds one.

-- ---------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_http_allow_ok(p_value text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  v_doc   jsonb;
  v_list  jsonb;
  v_entry jsonb;
BEGIN
  BEGIN
    v_doc := p_value::jsonb;
  EXCEPTION WHEN others THEN
    RETURN false;
  END;
  IF jsonb_typeof(v_doc) <> 'object'
     OR EXISTS (SELECT 1 FROM jsonb_object_keys(v_doc) k WHERE k NOT IN ('all', 'platform', 'tenants'))
     OR (v_doc ? 'tenants' AND jsonb_typeof(v_doc -> 'tenants') <> 'object') THEN
    RETURN false;
  END IF;
  FOR v_list IN
    SELECT v_doc -> 'all' WHERE v_doc ? 'all'
    UNION ALL SELECT v_doc -> 'platform' WHERE v_doc ? 'platform'
    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'tenants', '{}')) t
  LOOP
    IF jsonb_typeof(v_list) <> 'array' THEN
      RETURN false;
    END IF;
    FOR v_entry IN SELECT e FROM jsonb_array_elements(v_list) e LOOP
      IF jsonb_typeof(v_entry) <> 'string' THEN
        RETURN false;
      END IF;
      CONTINUE WHEN lower(btrim(v_entry #>> '{}'))
        ~ '^(\*\.)?[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$'
        AND lower(btrim(v_entry #>> '{}')) !~ '^[0-9.]+$';
      BEGIN
        PERFORM (v_entry #>> '{}')::cidr;
      EXCEPTION WHEN others THEN
        BEGIN
          PERFORM (v_entry #>> '{}')::inet;
        EXCEPTION WHEN others THEN
          RETURN false;
        END;
      END;
    END LOOP;
  END LOOP;
  RETURN true;
END;
$$;
COMMENT ON FUNCTION edm.job_http_allow_ok(text) IS
  'True when p_value is a valid jobs.http_allow setting: a JSON object {"all": [...], "platform": [...], "tenants": {"<tenant>": [...]}} whose lists hold networks (10.20.0.0/16, 127.0.0.1, fd00::/8) or host names (crm.intranet.example, *.intranet.example). Backs a CHECK on edm.config.';

CREATE FUNCTION edm.job_tenant_list_ok(p_value text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  v_doc jsonb;
BEGIN
  BEGIN
    v_doc := p_value::jsonb;
  EXCEPTION WHEN others THEN
    RETURN false;
  END;
  RETURN jsonb_typeof(v_doc) = 'array'
     AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_doc) e
                     WHERE jsonb_typeof(e) <> 'string' OR length(e #>> '{}') = 0);
END;
$$;
COMMENT ON FUNCTION edm.job_tenant_list_ok(text) IS
  'True when p_value is a JSON array of non-empty tenant ids (the jobs.shell_tenants setting; "*" stands for every tenant). Backs a CHECK on edm.config.';

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('jobs.http_allow', '"{}"', '"{}"', 'jobs', 'text', NULL, NULL, NULL, 'Destinations opened to http jobs despite the outbound guard (which refuses loopback, private, carrier-grade NAT, link-local, multicast, reserved and unspecified addresses): JSON text {"all": [...], "platform": [...], "tenants": {"<tenant>": [...]}} of networks or host names. See docs/jobs.md#security.'),
  ('jobs.shell_tenants', '"[]"', '"[]"', 'jobs', 'text', NULL, NULL, NULL, 'Tenants whose jobs may be shell commands, as JSON text ["acme", ...] ("*": every tenant). A tenant''s shell job also needs jobs.shell_enabled, and runners allow_shell=True.'),
  ('jobs.max_running_per_tenant', '0', '0', 'jobs', 'integer', 0, 100000, 'executions', 'Most executions of one tenant''s jobs running at once, all kinds together and across all runners (0: no limit). Executions over it wait, pending.');

ALTER TABLE edm.config ADD CONSTRAINT config_jobs_security_values CHECK (
  CASE key
    WHEN 'jobs.http_allow' THEN edm.job_http_allow_ok(value #>> '{}')
    WHEN 'jobs.shell_tenants' THEN edm.job_tenant_list_ok(value #>> '{}')
    ELSE true
  END);
COMMENT ON CONSTRAINT config_jobs_security_values ON edm.config IS
  'jobs.http_allow and jobs.shell_tenants hold well-formed JSON text (edm.job_http_allow_ok, edm.job_tenant_list_ok).';

-- ---------------------------------------------------------------------------
-- Shell jobs of tenants
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.jobs_check_write()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_max     integer;
  v_n       bigint;
  v_tenants jsonb;
BEGIN
  IF NEW.kind = 'shell'
     AND (TG_OP = 'INSERT' OR OLD.kind IS DISTINCT FROM NEW.kind OR OLD.target IS DISTINCT FROM NEW.target
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id) THEN
    IF NOT coalesce((SELECT (c.value #>> '{}')::boolean FROM edm.config c
                     WHERE c.key = 'jobs.shell_enabled'), false) THEN
      RAISE EXCEPTION 'shell jobs are disabled: set jobs.shell_enabled to true to allow them'
        USING ERRCODE = 'ED012';
    END IF;
    IF NEW.tenant_id IS NOT NULL THEN
      SELECT (c.value #>> '{}')::jsonb INTO v_tenants FROM edm.config c
      WHERE c.key = 'jobs.shell_tenants';
      IF NOT coalesce(v_tenants ? NEW.tenant_id OR v_tenants ? '*', false) THEN
        RAISE EXCEPTION 'shell jobs are not allowed for tenant %: add it to jobs.shell_tenants',
          quote_literal(NEW.tenant_id) USING ERRCODE = 'ED012';
      END IF;
    END IF;
  END IF;
  IF NEW.tenant_id IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id) THEN
    -- Serialise job creation per tenant, so two concurrent creations cannot
    -- both take the tenant's last slot.
    PERFORM pg_advisory_xact_lock(hashtextextended('edm.jobs.tenant:' || NEW.tenant_id, 0));
    v_max := edm.config_int('jobs.max_jobs_per_tenant');
    SELECT count(*) INTO v_n FROM edm.jobs j WHERE j.tenant_id = NEW.tenant_id;
    IF v_n >= v_max THEN
      RAISE EXCEPTION 'tenant % already has % jobs (jobs.max_jobs_per_tenant = %)',
        NEW.tenant_id, v_n, v_max USING ERRCODE = 'ED014';
    END IF;
  END IF;
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.jobs_check_write() IS
  'Trigger: refuses shell jobs unless jobs.shell_enabled, and a tenant''s shell job unless the tenant is in jobs.shell_tenants (ED012); refuses a tenant''s job beyond jobs.max_jobs_per_tenant (ED014, serialised per tenant by an advisory lock).';

-- ---------------------------------------------------------------------------
-- Per-tenant concurrency
-- ---------------------------------------------------------------------------

CREATE INDEX job_executions_tenant_running_idx ON edm.job_executions (tenant_id)
  WHERE status = 'running';
COMMENT ON INDEX edm.job_executions_tenant_running_idx IS
  'Running executions of a tenant (jobs.max_running_per_tenant, checked by edm.job_claim).';

CREATE OR REPLACE FUNCTION edm.job_claim(p_worker text, p_limit integer DEFAULT 1, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (
  execution_id bigint, job_id bigint, tenant_id text, job_name text, kind text, target jsonb,
  trigger text, scheduled_for timestamptz, retry_count integer, timeout_seconds integer,
  started_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_margin  interval := make_interval(secs => edm.config_int('jobs.lease_margin'));
  v_per_tenant integer := edm.config_int('jobs.max_running_per_tenant');
  v_c       record;
  v_n       integer := 0;
  v_running bigint;
  v_full    bigint[] := '{}';
  v_full_tenants text[] := '{}';
BEGIN
  IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'job_claim: worker id must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'job_claim: limit must be between 1 and 1000, got %', p_limit USING ERRCODE = 'ED005';
  END IF;

  -- Pending executions that are due, best first, whose job has a free slot as
  -- far as this snapshot knows. SKIP LOCKED: a row another runner is claiming
  -- is theirs. The LIMIT bounds the rows locked by one call.
  FOR v_c IN
    SELECT e.execution_id, e.job_id, e.trigger, e.tenant_id
    FROM edm.job_executions e
    JOIN edm.jobs j ON j.job_id = e.job_id
    WHERE e.status = 'pending' AND e.run_after <= v_now
      AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR e.trigger = 'manual')
    ORDER BY e.priority DESC, e.run_after, e.execution_id
    LIMIT p_limit * 4 + 16
    FOR UPDATE OF e SKIP LOCKED
  LOOP
    CONTINUE WHEN v_c.job_id = ANY (v_full);
    -- The tenant's share of running executions (jobs.max_running_per_tenant).
    -- A transaction-scoped advisory lock per tenant serialises the check with
    -- other claimers; taken with try, so a claim never waits: a tenant another
    -- runner is claiming for right now is left for the next call. Holding the
    -- lock, the count (a new snapshot per statement) sees every committed claim.
    IF v_per_tenant > 0 AND v_c.tenant_id IS NOT NULL THEN
      CONTINUE WHEN v_c.tenant_id = ANY (v_full_tenants);
      IF NOT pg_try_advisory_xact_lock(hashtextextended('edm.jobs.running:' || v_c.tenant_id, 0)) THEN
        v_full_tenants := v_full_tenants || v_c.tenant_id;
        CONTINUE;
      END IF;
      SELECT count(*) INTO v_running FROM edm.job_executions e
      WHERE e.tenant_id = v_c.tenant_id AND e.status = 'running';
      IF v_running >= v_per_tenant THEN
        v_full_tenants := v_full_tenants || v_c.tenant_id;
        CONTINUE;
      END IF;
    END IF;
    -- Take one of the job's max_concurrent slots. The job row is locked with
    -- SKIP LOCKED so the claim never waits (a job being fired or edited right
    -- now is tried again on the next call); holding the lock, the slot check
    -- reads the latest running_count, so two claimers never share a slot.
    PERFORM 1 FROM edm.jobs j WHERE j.job_id = v_c.job_id FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;
    UPDATE edm.jobs j SET running_count = j.running_count + 1
    WHERE j.job_id = v_c.job_id AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR v_c.trigger = 'manual');
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;

    RETURN QUERY
    UPDATE edm.job_executions e
    SET status = 'running', worker_id = p_worker, started_at = v_now,
        lease_expires_at = v_now + make_interval(secs => j.timeout_seconds) + v_margin
    FROM edm.jobs j
    WHERE e.execution_id = v_c.execution_id AND j.job_id = e.job_id
    RETURNING e.execution_id, e.job_id, e.tenant_id, j.name, j.kind, j.target, e.trigger,
              e.scheduled_for, e.retry_count, j.timeout_seconds, e.started_at, e.lease_expires_at;
    v_n := v_n + 1;
    EXIT WHEN v_n >= p_limit;
  END LOOP;
END;
$$;
COMMENT ON FUNCTION edm.job_claim(text, integer, timestamptz) IS
  'Claims up to p_limit due pending executions for runner p_worker, highest priority and earliest first, taking one of their job''s max_concurrent slots each and, when jobs.max_running_per_tenant > 0, staying within the tenant''s share of running executions; marks them running with a lease of timeout + jobs.lease_margin. Skips executions of paused jobs (except manual runs). Never waits on a lock.';

-- A runner sleeps until edm.job_next_wakeup(): pending executions of a tenant
-- at its cap are not work it could take, or idle runners would spin on them.
-- The runner that frees one of the tenant's slots runs a pass right after.
CREATE OR REPLACE FUNCTION edm.job_next_wakeup(p_now timestamptz DEFAULT NULL)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN least(
  (SELECT min(j.next_run_at) FROM edm.jobs j WHERE j.status = 'active'),
  (SELECT min(e.run_after) FROM edm.job_executions e JOIN edm.jobs j ON j.job_id = e.job_id
   WHERE e.status = 'pending' AND j.running_count < j.max_concurrent
     AND (j.status <> 'paused' OR e.trigger = 'manual')
     AND (e.tenant_id IS NULL
          OR coalesce(edm.config_int('jobs.max_running_per_tenant'), 0) = 0
          OR (SELECT count(*) FROM edm.job_executions r
              WHERE r.tenant_id = e.tenant_id AND r.status = 'running')
             < edm.config_int('jobs.max_running_per_tenant'))),
  (SELECT min(e.lease_expires_at) FROM edm.job_executions e WHERE e.status = 'running'));
COMMENT ON FUNCTION edm.job_next_wakeup(timestamptz) IS
  'The earliest time a runner could have work: a job''s next run, a claimable pending execution (manual run, retry, catch-up; not one of a tenant at jobs.max_running_per_tenant), or a lease expiring. NULL when nothing is scheduled. Runners sleep until then or a NOTIFY edm_jobs.';

COMMENT ON COLUMN edm.job_executions.error_kind IS
  'timeout, connection, http_status, unexpected_status, exception, exit_status, lost, config, permanent, cancelled or blocked (the outbound guard refused the destination of an http job); matched against the job''s retry_on. config, permanent, cancelled and blocked are never retried.';

-- CREATE OR REPLACE resets SECURITY DEFINER and the pinned search_path.
SELECT edm.harden_functions();
