-- 0006_security.sql: least privilege and the audit trail.
--
-- * Every function that writes runs SECURITY DEFINER with a fixed
--   search_path (pg_catalog, pg_temp), so a role needs EXECUTE on the
--   function, not write privileges on the tables, and no caller can shadow
--   an object through its own search_path.
-- * EXECUTE is revoked from PUBLIC; edm.install_roles() creates (when
--   missing) the group roles edm_dispatcher, edm_app and edm_monitor and
--   grants each exactly what its job needs. docs/operations.md lists them.
-- * Administrative changes land in the append-only edm.audit_log.

-- ---------------------------------------------------------------------------
-- Audit trail
-- ---------------------------------------------------------------------------

CREATE TABLE edm.audit_log (
  audit_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at          timestamptz NOT NULL DEFAULT clock_timestamp(),
  actor       text NOT NULL,
  db_role     text NOT NULL DEFAULT session_user,
  action      text NOT NULL CHECK (action IN ('insert', 'update', 'delete')),
  object_type text NOT NULL,
  object_id   text NOT NULL,
  before      jsonb,
  after       jsonb
);
COMMENT ON TABLE edm.audit_log IS
  'Append-only record of administrative changes (services, grants, user quotas, task pause/resume/cancel, config, jobs) with before/after values. Secrets are never stored anywhere in edm, so none appear here.';
COMMENT ON COLUMN edm.audit_log.audit_id IS 'Surrogate id, in commit-ish order.';
COMMENT ON COLUMN edm.audit_log.at IS 'When the change was made.';
COMMENT ON COLUMN edm.audit_log.actor IS 'Who made it: the application user set in edm.actor (SET LOCAL edm.actor = ...), else the database role.';
COMMENT ON COLUMN edm.audit_log.db_role IS 'The database session role that made the change.';
COMMENT ON COLUMN edm.audit_log.action IS 'insert, update or delete.';
COMMENT ON COLUMN edm.audit_log.object_type IS 'service, grant, user, task, config or job.';
COMMENT ON COLUMN edm.audit_log.object_id IS 'Id of the object changed.';
COMMENT ON COLUMN edm.audit_log.before IS 'Audited fields before the change (NULL for inserts).';
COMMENT ON COLUMN edm.audit_log.after IS 'Audited fields after the change (NULL for deletes).';
CREATE INDEX audit_log_object_idx ON edm.audit_log (object_type, object_id, audit_id);
COMMENT ON INDEX edm.audit_log_object_idx IS 'History of one object.';

CREATE FUNCTION edm.audit_log_append_only()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  RAISE EXCEPTION 'edm.audit_log is append-only' USING ERRCODE = '42501';
END;
$$;
COMMENT ON FUNCTION edm.audit_log_append_only() IS 'Trigger: refuses UPDATE and DELETE on edm.audit_log, even for its owner.';
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON edm.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION edm.audit_log_append_only();

CREATE FUNCTION edm.audit_fields(p_type text, p_row jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
RETURN CASE p_type
  WHEN 'service' THEN jsonb_build_object(
    'name', p_row -> 'name', 'transport', p_row -> 'transport', 'settings', p_row -> 'settings',
    'credential_ref', p_row -> 'credential_ref', 'from_addresses', p_row -> 'from_addresses',
    'interval_ms', p_row -> 'interval_ms', 'daily_quota', p_row -> 'daily_quota',
    'quota_tz', p_row -> 'quota_tz', 'enabled', p_row -> 'enabled')
  WHEN 'grant' THEN jsonb_build_object(
    'service_id', p_row -> 'service_id', 'user_id', p_row -> 'user_id', 'priority', p_row -> 'priority')
  WHEN 'user' THEN jsonb_build_object(
    'display_name', p_row -> 'display_name', 'quota_limit', p_row -> 'quota_limit')
  WHEN 'task' THEN jsonb_build_object(
    'user_id', p_row -> 'user_id', 'name', p_row -> 'name', 'status', p_row -> 'status',
    'priority', p_row -> 'priority', 'scheduled_at', p_row -> 'scheduled_at',
    'total_count', p_row -> 'total_count')
  WHEN 'config' THEN jsonb_build_object('value', p_row -> 'value')
  WHEN 'job' THEN p_row - ARRAY['next_run_at', 'last_scheduled_for', 'last_fired_at',
                                'last_finished_at', 'last_status', 'run_count', 'running_count',
                                'success_count', 'failure_count', 'misfire_count', 'created_at',
                                'updated_at']
END;
COMMENT ON FUNCTION edm.audit_fields(text, jsonb) IS
  'The fields recorded in the audit log for an object type (administrative settings only, never counters or runtime state).';

CREATE FUNCTION edm.audit_row()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_type text := TG_ARGV[0];
  v_before jsonb;
  v_after jsonb;
  v_id text;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    v_before := edm.audit_fields(v_type, to_jsonb(OLD));
  END IF;
  IF TG_OP <> 'DELETE' THEN
    v_after := edm.audit_fields(v_type, to_jsonb(NEW));
  END IF;
  IF TG_OP = 'UPDATE' AND v_before = v_after THEN
    RETURN NULL;
  END IF;
  v_id := CASE v_type
    WHEN 'service' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'service_id'
    WHEN 'grant' THEN (to_jsonb(coalesce(NEW, OLD)) ->> 'service_id') || ':'
                      || (to_jsonb(coalesce(NEW, OLD)) ->> 'user_id')
    WHEN 'user' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'user_id'
    WHEN 'task' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'task_id'
    WHEN 'config' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'key'
    WHEN 'job' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'job_id'
  END;
  INSERT INTO edm.audit_log (actor, action, object_type, object_id, before, after)
  VALUES (coalesce(nullif(current_setting('edm.actor', true), ''), session_user),
          lower(TG_OP), v_type, v_id, v_before, v_after);
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.audit_row() IS
  'Trigger: appends one edm.audit_log row per administrative change (argument: the object type). Updates that change no audited field are not recorded.';

CREATE TRIGGER services_audit AFTER INSERT OR DELETE ON edm.services
  FOR EACH ROW EXECUTE FUNCTION edm.audit_row('service');
CREATE TRIGGER services_audit_upd AFTER UPDATE ON edm.services
  FOR EACH ROW WHEN ((OLD.name, OLD.transport, OLD.settings, OLD.credential_ref, OLD.from_addresses,
                      OLD.interval_ms, OLD.daily_quota, OLD.quota_tz, OLD.enabled)
                     IS DISTINCT FROM
                     (NEW.name, NEW.transport, NEW.settings, NEW.credential_ref, NEW.from_addresses,
                      NEW.interval_ms, NEW.daily_quota, NEW.quota_tz, NEW.enabled))
  EXECUTE FUNCTION edm.audit_row('service');
CREATE TRIGGER grants_audit AFTER INSERT OR UPDATE OR DELETE ON edm.grants
  FOR EACH ROW EXECUTE FUNCTION edm.audit_row('grant');
CREATE TRIGGER users_audit AFTER INSERT OR DELETE ON edm.users
  FOR EACH ROW EXECUTE FUNCTION edm.audit_row('user');
CREATE TRIGGER users_audit_upd AFTER UPDATE ON edm.users
  FOR EACH ROW WHEN ((OLD.quota_limit, OLD.display_name) IS DISTINCT FROM
                     (NEW.quota_limit, NEW.display_name))
  EXECUTE FUNCTION edm.audit_row('user');
CREATE TRIGGER tasks_audit AFTER INSERT ON edm.tasks
  FOR EACH ROW EXECUTE FUNCTION edm.audit_row('task');
CREATE TRIGGER tasks_audit_upd AFTER UPDATE OF status ON edm.tasks
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                     AND (NEW.status IN ('paused', 'cancelled') OR OLD.status = 'paused'))
  EXECUTE FUNCTION edm.audit_row('task');
CREATE TRIGGER config_audit AFTER UPDATE ON edm.config
  FOR EACH ROW WHEN (OLD.value IS DISTINCT FROM NEW.value)
  EXECUTE FUNCTION edm.audit_row('config');
CREATE TRIGGER jobs_audit AFTER INSERT OR DELETE ON edm.jobs
  FOR EACH ROW EXECUTE FUNCTION edm.audit_row('job');
-- Firing a job updates its runtime columns on every run: only changes of its
-- definition are administrative.
CREATE TRIGGER jobs_audit_upd AFTER UPDATE ON edm.jobs
  FOR EACH ROW WHEN ((OLD.tenant_id, OLD.name, OLD.description, OLD.kind, OLD.target, OLD.cron_expr,
                      OLD.timezone, OLD.start_at, OLD.end_at, OLD.max_executions, OLD.status,
                      OLD.inactive_reason, OLD.priority, OLD.max_concurrent, OLD.timeout_seconds,
                      OLD.max_retries, OLD.retry_delay_seconds, OLD.retry_backoff,
                      OLD.retry_max_delay_seconds, OLD.retry_on, OLD.misfire_policy,
                      OLD.misfire_grace_seconds, OLD.tags)
                     IS DISTINCT FROM
                     (NEW.tenant_id, NEW.name, NEW.description, NEW.kind, NEW.target, NEW.cron_expr,
                      NEW.timezone, NEW.start_at, NEW.end_at, NEW.max_executions, NEW.status,
                      NEW.inactive_reason, NEW.priority, NEW.max_concurrent, NEW.timeout_seconds,
                      NEW.max_retries, NEW.retry_delay_seconds, NEW.retry_backoff,
                      NEW.retry_max_delay_seconds, NEW.retry_on, NEW.misfire_policy,
                      NEW.misfire_grace_seconds, NEW.tags))
  EXECUTE FUNCTION edm.audit_row('job');

-- ---------------------------------------------------------------------------
-- SECURITY DEFINER everywhere something is written
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.harden_functions()
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  f regprocedure;
  v_n integer := 0;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'edm'::regnamespace AND p.prokind = 'f'
      AND p.provolatile = 'v' AND p.prorettype <> 'trigger'::regtype
      AND p.proname NOT IN ('harden_functions', 'install_roles', 'share_staged')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    v_n := v_n + 1;
  END LOOP;
  -- Read-only functions that look at tables the calling role may not read.
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'edm'::regnamespace
      AND p.proname IN ('next_wakeup', 'task_wait_reason', 'job_next_wakeup')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    v_n := v_n + 1;
  END LOOP;
  EXECUTE 'REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA edm FROM PUBLIC';
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.harden_functions() IS
  'Makes every volatile (writing) function of schema edm SECURITY DEFINER with search_path pg_catalog, pg_temp, and revokes EXECUTE from PUBLIC. Run by this migration; later migrations that add functions call it again.';

-- Let a SECURITY DEFINER function read the caller's staging table when the
-- function owner is not a superuser (COPY goes into a session temp table).
CREATE FUNCTION edm.share_staged(p_table text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_owner text := (SELECT n.nspowner::regrole::text FROM pg_namespace n WHERE n.nspname = 'edm');
BEGIN
  IF p_table NOT IN ('edm_stage_recipients', 'edm_stage_contacts') THEN
    RAISE EXCEPTION 'not a staging table: %', p_table USING ERRCODE = 'ED005';
  END IF;
  IF v_owner <> current_user THEN
    EXECUTE format('GRANT SELECT ON pg_temp.%I TO %I', p_table, v_owner);
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.share_staged(text) IS
  'Grants the edm schema owner (whose rights the SECURITY DEFINER functions run with) SELECT on the caller''s session staging table p_table. Runs with the caller''s rights.';

-- ---------------------------------------------------------------------------
-- Roles
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.install_roles(p_dispatcher text DEFAULT 'edm_dispatcher',
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
    'job_expire_runs', 'job_next_wakeup', 'job_purge_executions', 'job_due', 'job_set_next_run'];
  v_app_fns text[] := ARRAY[
    'upsert_user', 'set_user_quota', 'create_service', 'update_service', 'grant_service',
    'revoke_service', 'merge_staged_contacts', 'set_contact_tags', 'delete_tag',
    'add_suppression', 'remove_suppression', 'create_task_from_staged', 'create_task_from_rule',
    'expand_task', 'pause_task', 'resume_task', 'cancel_task', 'task_wait_reason', 'config_set',
    'share_staged', 'email_problem', 'is_valid_email', 'normalize_email', 'is_valid_timezone',
    'rule_matches', 'service_sent_today', 'service_is_ready',
    'job_create', 'job_update', 'job_delete', 'job_trigger', 'job_pause', 'job_resume',
    'job_stop', 'job_cancel_execution', 'job_validate'];
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
                 'edm.jobs_overview TO %I', p_app);

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
COMMENT ON FUNCTION edm.install_roles(text, text, text) IS
  'Creates (when missing) the NOLOGIN group roles for the dispatcher, the host application and monitoring, and grants each exactly what its job needs. Needs CREATEROLE (or existing roles) and the schema owner''s rights; idempotent. Grant the groups to your login roles: GRANT edm_dispatcher TO my_sidecar_login.';

SELECT edm.harden_functions();
